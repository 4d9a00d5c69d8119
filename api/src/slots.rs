//! Places for long-lived work (event streams, uploads), counted per key (a client address, an
//! account) and in all, so that no one key can take every place. A place is held as a value
//! and freed when it is dropped, however its request ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::ApiError;

/// How many places there are.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub total: u32,
    pub per_key: u32,
}

/// What a refusal says: 429 with this code, and a message for each limit.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub code: &'static str,
    pub all_taken: &'static str,
    pub key_full: &'static str,
    /// The gauge of places taken, and the counter of refusals.
    pub gauge: &'static str,
    pub refused: &'static str,
}

/// The places of one kind in this process.
#[derive(Debug)]
pub struct Slots<K> {
    limits: Limits,
    refusal: Refusal,
    taken: Mutex<(u32, HashMap<K, u32>)>,
}

/// A place; dropping it frees it.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Slots<K> {
    pub fn new(limits: Limits, refusal: Refusal) -> Arc<Slots<K>> {
        Arc::new(Slots { limits, refusal, taken: Mutex::default() })
    }

    fn taken(&self) -> MutexGuard<'_, (u32, HashMap<K, u32>)> {
        self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for `key`, or 429 (`Retry-After: 5`).
    pub fn take(self: &Arc<Self>, key: K) -> Result<Slot<K>, ApiError> {
        let mut taken = self.taken();
        let (total, by_key) = &mut *taken;
        let mine = by_key.get(&key).copied().unwrap_or(0);
        let refused = if *total >= self.limits.total {
            Some(self.refusal.all_taken)
        } else if mine >= self.limits.per_key {
            Some(self.refusal.key_full)
        } else {
            None
        };
        if let Some(why) = refused {
            metrics::counter!(self.refusal.refused).increment(1);
            return Err(crate::throttle::too_many(Duration::from_secs(5), self.refusal.code, why));
        }
        *total += 1;
        by_key.insert(key.clone(), mine + 1);
        metrics::gauge!(self.refusal.gauge).set(f64::from(*total));
        Ok(Slot { slots: self.clone(), key })
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut taken = self.slots.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_key) = &mut *taken;
        *total = total.saturating_sub(1);
        if let Some(count) = by_key.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                by_key.remove(&self.key);
            }
        }
        metrics::gauge!(self.slots.refusal.gauge).set(f64::from(*total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSAL: Refusal =
        Refusal { code: "too_many_things", all_taken: "all taken", key_full: "yours taken", gauge: "g", refused: "r" };

    #[test]
    fn places_are_bounded_per_key_and_in_all_and_freed_on_drop() {
        let slots = Slots::new(Limits { total: 3, per_key: 2 }, REFUSAL);
        let first = slots.take("a").expect("a 1");
        let _second = slots.take("a").expect("a 2");
        let refused = slots.take("a").expect_err("a 3");
        assert_eq!(
            (refused.status.as_u16(), refused.code, refused.message.as_str()),
            (429, "too_many_things", "yours taken; retry in 5 s")
        );
        assert!(refused.header.is_some_and(|(name, _)| name == "retry-after"));
        let _third = slots.take("b").expect("b 1");
        assert_eq!(slots.take("b").expect_err("all taken").message, "all taken; retry in 5 s");
        drop(first);
        slots.take("b").expect("a place was freed");
    }
}

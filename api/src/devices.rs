//! The push devices of the signed-in account: `PUT` and `DELETE /v1/me/devices/{token}`.
//!
//! An app registers the FCM registration token it was given (and again whenever FCM gives
//! it a new one), and unregisters it when its user signs out. Pushes go to the devices
//! registered (see `waveline_shared::push`); each account keeps its 20 most recently
//! registered.
//!
//! - **Idempotent.** Both answer 204 whether or not anything changed.
//! - **Nothing leaks.** A token another account registered moves to the caller on `PUT` (one
//!   install, one account at a time); `DELETE` of a token the caller does not have answers
//!   204 and changes nothing, so a caller learns nothing about others' tokens.
//! - **Rate.** Both count against `social_writes_per_minute`, like every other write of an
//!   account.

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use waveline_shared::push::{DeviceToken, Platform};

use crate::AppState;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::social::Done;

#[derive(Tags)]
enum Tag {
    /// The devices push notifications go to.
    Devices,
}

/// The device routes.
#[derive(Debug)]
pub struct Devices {
    pub state: AppState,
}

/// The kind of app that holds a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
enum PlatformName {
    Android,
    Ios,
    Web,
}

impl From<PlatformName> for Platform {
    fn from(name: PlatformName) -> Platform {
        match name {
            PlatformName::Android => Platform::Android,
            PlatformName::Ios => Platform::Ios,
            PlatformName::Web => Platform::Web,
        }
    }
}

/// A device registration.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct DeviceRegistration {
    /// `android`, `ios` or `web`.
    platform: PlatformName,
}

/// The token of the path, checked once more by the type every layer uses.
fn device_token(text: &str) -> Result<DeviceToken, ApiError> {
    DeviceToken::parse(text).map_err(|err| ApiError::bad_request("invalid_field", err.to_string()))
}

#[OpenApi(tag = "Tag::Devices")]
impl Devices {
    /// Registers this device's FCM registration token for push notifications (idempotent;
    /// again after FCM hands the app a new token). The account keeps its 20 most recently
    /// registered devices.
    #[oai(path = "/v1/me/devices/:token", method = "put")]
    async fn register(
        &self,
        /// The FCM registration token: 1–4096 letters, digits, `_`, `:` and `-`.
        #[oai(validator(min_length = 1, max_length = 4096, pattern = "^[A-Za-z0-9_:-]+$"))]
        token: Path<String>,
        registration: Json<DeviceRegistration>,
        auth: Auth,
    ) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        let token = device_token(&token.0)?;
        if !self.state.devices.register(me, &token, registration.0.platform.into()).await? {
            return Err(ApiError::unauthorized("the account no longer exists"));
        }
        Ok(Done::Done)
    }

    /// Unregisters a device of yours (idempotent: a token you do not have answers 204 too,
    /// and stays as it is).
    #[oai(path = "/v1/me/devices/:token", method = "delete")]
    async fn unregister(
        &self,
        /// The FCM registration token: 1–4096 letters, digits, `_`, `:` and `-`.
        #[oai(validator(min_length = 1, max_length = 4096, pattern = "^[A-Za-z0-9_:-]+$"))]
        token: Path<String>,
        auth: Auth,
    ) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        self.state.devices.unregister(me, &device_token(&token.0)?).await?;
        Ok(Done::Done)
    }
}

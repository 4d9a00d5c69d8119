//! Deleting an account and everything of it (`DELETE /v1/me`), across Stripe and the three
//! stores.
//!
//! The order makes a failure safe to retry. Billing ends first: the account's Stripe customer
//! is deleted, which cancels its subscriptions, so a deleted account is never charged again.
//! If Stripe fails (or would have to be asked but is not configured here), nothing has been
//! removed; a retry after a later step failed finds the customer gone at Stripe and goes on.
//! Then the documents go (the account's comments and activities, and the comments and
//! activities about its tracks and playlists). If the document store is down, nothing else
//! has happened and the account still exists, so the owner can try again. Then one database
//! transaction removes the account with every row of it (tracks, playlists, follows, blocks,
//! likes, reposts, sessions, its billing rows). After that nobody can reach its objects
//! (tracks with their artwork, playlists' artwork, the avatar), which are deleted last. A
//! track or playlist created between the two steps has its documents removed after the
//! transaction too.

use std::collections::HashSet;

use waveline_shared::db::social::DeletedAccount;
use waveline_shared::documents::{ActivityObject, DocumentsError};
use waveline_shared::domain::UserId;
use waveline_shared::images::ImageSubject;

use crate::AppState;
use crate::error::ApiError;

/// Deletes `user` and everything of it.
pub(crate) async fn delete_account(state: &AppState, user: UserId) -> Result<(), ApiError> {
    state.billing.end_for_deletion(user).await?;
    let owned = state.social.owned(user).await?;
    remove_documents(state, user, &owned).await?;
    let Some(deleted) = state.social.delete_account(user).await? else {
        return Err(ApiError::not_found("user"));
    };
    let known_tracks: HashSet<_> = owned.tracks.iter().collect();
    let known_playlists: HashSet<_> = owned.playlists.iter().collect();
    let late = DeletedAccount {
        tracks: deleted.tracks.iter().filter(|t| !known_tracks.contains(t)).copied().collect(),
        playlists: deleted.playlists.iter().filter(|p| !known_playlists.contains(p)).copied().collect(),
    };
    if let Err(err) = remove_documents(state, user, &late).await {
        tracing::error!(%user, error = %err, "could not remove the documents of a deleted account's newest objects");
    }
    for track in deleted.tracks {
        state.track_changed(track);
        crate::tracks::delete_objects(state.storage.as_ref(), track).await;
    }
    for playlist in deleted.playlists {
        crate::artwork::delete_objects(state, ImageSubject::Playlist, playlist.0).await;
    }
    crate::artwork::delete_objects(state, ImageSubject::User, user.0).await;
    Ok(())
}

async fn remove_documents(state: &AppState, user: UserId, owned: &DeletedAccount) -> Result<(), DocumentsError> {
    let documents = state.documents.as_ref();
    documents.delete_account(user).await?;
    for track in &owned.tracks {
        documents.delete_track_comments(*track).await?;
        documents.delete_object_activities(ActivityObject::Track(*track), None).await?;
    }
    for playlist in &owned.playlists {
        documents.delete_object_activities(ActivityObject::Playlist(*playlist), None).await?;
    }
    Ok(())
}

//! Waveline HTTP API. The routes land with the API issue.

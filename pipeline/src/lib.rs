//! Waveline audio pipeline (pure audio work, no network). The stages land with the pipeline issue.

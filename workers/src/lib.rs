//! Waveline workers. The job loop lands with the worker-fleet issue.

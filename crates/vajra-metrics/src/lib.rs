//! vajra-metrics

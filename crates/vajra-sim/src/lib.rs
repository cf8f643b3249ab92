//! vajra-sim

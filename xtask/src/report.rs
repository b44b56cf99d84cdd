//! Test reports (being written).

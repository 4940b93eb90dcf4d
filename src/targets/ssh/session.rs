//! SSH connections to hosts (being built).

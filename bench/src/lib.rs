//! subway's benchmark kit: frame templates for the packet generator,
//! packet-size mixes, CPU accounting from /proc/stat, result tables, and
//! the scenarios subway-bench runs.

pub mod ceiling;
pub mod cpu;
pub mod frames;
pub mod latency;
pub mod plot;
pub mod report;
pub mod scenario;

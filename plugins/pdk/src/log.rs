//! Structured logging through the host (the only capability plugins get).

use crate::bindings::wasmgate::plugin::log::log as host_log;
use crate::LogLevel;

/// Log at debug level.
pub fn debug(message: &str) {
    host_log(LogLevel::Debug, message);
}
/// Log at info level.
pub fn info(message: &str) {
    host_log(LogLevel::Info, message);
}
/// Log at warn level.
pub fn warn(message: &str) {
    host_log(LogLevel::Warn, message);
}
/// Log at error level.
pub fn error(message: &str) {
    host_log(LogLevel::Error, message);
}

//! D-Bus errors of the Manager interface (names fixed by CONTRACTS).

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

pub const INVALID_PLAN: &str = "org.liminalqa.Liminal1.Error.InvalidPlan";
pub const NOT_FOUND: &str = "org.liminalqa.Liminal1.Error.NotFound";
pub const QUEUE_FULL: &str = "org.liminalqa.Liminal1.Error.QueueFull";
pub const SECRET_REJECTED: &str = "org.liminalqa.Liminal1.Error.SecretRejected";
pub const SPOOL_FULL: &str = "org.liminalqa.Liminal1.Error.SpoolFull";
pub const TRIMMED: &str = "org.liminalqa.Liminal1.Error.Trimmed";
pub const STOPPING: &str = "org.liminalqa.Liminal1.Error.Stopping";
pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
pub const FAILED: &str = "org.freedesktop.DBus.Error.Failed";

/// An error reply: a fixed name and a human message.
///
/// Hand-written rather than `#[derive(DBusError)]` because one interface
/// returns names from two namespaces (ours and `org.freedesktop.DBus.Error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {message}")]
pub struct BusError {
    pub name: &'static str,
    pub message: String,
}

impl BusError {
    pub fn new(name: &'static str, message: impl Into<String>) -> Self {
        BusError {
            name,
            message: message.into(),
        }
    }
    pub fn not_found(run_id: &str) -> Self {
        Self::new(NOT_FOUND, format!("no run with id {run_id} (the daemon keeps the latest --keep-runs finished runs; older ones are in the database: liminal.runs)"))
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FAILED, message)
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name())?.build(&(self.message.as_str(),))
    }
    fn name(&self) -> ErrorName<'_> {
        // The names above are valid constants; a static str always parses.
        ErrorName::from_static_str_unchecked(self.name)
    }
    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        BusError::failed(e.to_string())
    }
}

pub type BusResult<T> = Result<T, BusError>;

//! Who may call what.
//!
//! Root is always allowed. With polkitd on the bus (it owns
//! `org.freedesktop.PolicyKit1`, or the bus can activate it), every method
//! asks it (`CheckAuthorization` for the caller's bus name), so admins
//! decide with polkit rules. Without polkit (containers, test buses, minimal
//! hosts) the fallback is: root, or a member of the access group (default
//! `liminal`, primary or supplementary per /etc/group via NSS).

use crate::error::{BusError, BusResult, ACCESS_DENIED};
use std::collections::HashMap;
use zbus::message::Header;
use zbus::zvariant::Value;

pub const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    StartRun,
    CancelRun,
    Read,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::StartRun => "org.liminalqa.liminal.start-run",
            Action::CancelRun => "org.liminalqa.liminal.cancel-run",
            Action::Read => "org.liminalqa.liminal.read",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authorizer {
    /// Group whose members may call when polkit is absent.
    pub group: String,
    /// Ask polkit when it is on the bus (off only for tests of the fallback).
    pub use_polkit: bool,
}

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait Authority {
    #[allow(clippy::type_complexity)]
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Value<'_>>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

impl Authorizer {
    /// Checks the caller of the message `hdr` for `action`; `Ok(())` allows.
    pub async fn check(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        action: Action,
    ) -> BusResult<()> {
        let sender = hdr
            .sender()
            .ok_or_else(|| BusError::new(ACCESS_DENIED, "message has no sender"))?
            .to_owned();
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| BusError::failed(format!("bus daemon proxy: {e}")))?;
        let uid = dbus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| BusError::new(ACCESS_DENIED, format!("cannot identify caller: {e}")))?;
        // Root may do anything here anyway (it can rewrite the polkit rules);
        // asking polkit for it would only add a round trip per call.
        if uid == 0 {
            return Ok(());
        }
        if self.use_polkit && polkit_present(&dbus).await {
            // Interactive authentication only when the caller asked for it.
            let interactive = hdr
                .primary()
                .flags()
                .contains(zbus::message::Flags::AllowInteractiveAuth);
            let authority = AuthorityProxy::new(conn)
                .await
                .map_err(|e| BusError::failed(format!("polkit proxy: {e}")))?;
            let mut subject_details = HashMap::new();
            subject_details.insert("name", Value::from(sender.as_str()));
            let (authorized, challenge, _) = authority
                .check_authorization(
                    &("system-bus-name", subject_details),
                    action.id(),
                    HashMap::new(),
                    u32::from(interactive),
                    "",
                )
                .await
                .map_err(|e| BusError::new(ACCESS_DENIED, format!("polkit: {e}")))?;
            tracing::debug!(uid, action = action.id(), authorized, "polkit decision");
            if authorized {
                return Ok(());
            }
            let why = if challenge {
                "authentication required"
            } else {
                "not authorized"
            };
            return Err(BusError::new(
                ACCESS_DENIED,
                format!("{} denied for uid {uid} by polkit: {why}", action.id()),
            ));
        }
        if in_group(uid, &self.group) {
            return Ok(());
        }
        tracing::info!(uid, action = action.id(), "access denied");
        Err(BusError::new(
            ACCESS_DENIED,
            format!(
                "{} denied: uid {uid} is neither root nor in group {}",
                action.id(),
                self.group
            ),
        ))
    }
}

/// polkitd is on the bus, or can be started by it. On Debian (and most
/// hosts) polkit.service is D-Bus activated: nobody owns the name until the
/// first call, so checking the owner alone would skip polkit on a fresh boot.
async fn polkit_present(dbus: &zbus::fdo::DBusProxy<'_>) -> bool {
    let Ok(name) = zbus::names::BusName::try_from(POLKIT_NAME) else {
        return false;
    };
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names()
        .await
        .map(|names| names.iter().any(|n| n.as_str() == POLKIT_NAME))
        .unwrap_or(false)
}

/// Whether `uid` belongs to `group` (primary group or listed in /etc/group).
pub fn in_group(uid: u32, group: &str) -> bool {
    let Some(grp) = uzers::get_group_by_name(group) else {
        return false;
    };
    let Some(user) = uzers::get_user_by_uid(uid) else {
        return false;
    };
    if user.primary_group_id() == grp.gid() {
        return true;
    }
    // getgrouplist(3): supplementary groups from /etc/group (and NSS).
    uzers::get_user_groups(user.name(), user.primary_group_id())
        .map(|groups| groups.iter().any(|g| g.gid() == grp.gid()))
        .unwrap_or(false)
}

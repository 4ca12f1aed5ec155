//! Who may do what: callers (from `SO_PEERCRED`), per-key policies and the
//! global admins from the config.
//!
//! - *use* (encrypt, decrypt, wrap, unwrap, generate, re-encrypt): a user in
//!   the key's policy, or anyone for the default organization key.
//! - *admin* (enable, disable, rotate, rotation settings, deletion,
//!   replication): an admin in the key's policy or a global admin.
//! - *read* (describe, rotation history, list): either of the above.
//!
//! Global admins administer every key but do not get to decrypt with it:
//! use is granted only by the key's own policy.

use kms_client::proto::Principal;

use super::model::KeyRecord;

/// The identity behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, when known.
    pub groups: Vec<u32>,
    pub pid: Option<i32>,
    internal: bool,
    /// For kmsd's own mount processes: the one key (name or id) they act
    /// on, and only to use it.
    scope: Option<String>,
}

impl Caller {
    /// A local process, as identified by the kernel.
    pub fn process(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        Self {
            uid,
            gid,
            groups: Vec::new(),
            pid,
            internal: false,
            scope: None,
        }
    }

    /// The daemon itself (scheduler, filesystem, replication): bypasses
    /// policies.
    pub fn internal() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            pid: None,
            internal: true,
            scope: None,
        }
    }

    /// A mount process kmsd started itself, on the channel kmsd gave it:
    /// it may use `key` (a name or an id) whatever the key's policy, as
    /// when kmsd served its filesystems in-process, and nothing else.
    pub fn internal_for_key(key: &str) -> Self {
        Self {
            scope: Some(key.to_string()),
            ..Self::internal()
        }
    }

    /// The one key this caller may act on, if it is limited to one.
    pub fn key_scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// True for the daemon's own requests.
    pub fn is_internal(&self) -> bool {
        self.internal
    }

    /// Does any of `principals` name this caller?
    pub fn matches(&self, principals: &[Principal]) -> bool {
        principals.iter().any(|p| match *p {
            Principal::Uid(u) => u == self.uid,
            Principal::Gid(g) => g == self.gid || self.groups.contains(&g),
        })
    }
}

/// The kind of access an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Use,
    Admin,
    Read,
}

impl Access {
    /// A verb for error messages.
    pub fn verb(self) -> &'static str {
        match self {
            Access::Use => "use",
            Access::Admin => "administer",
            Access::Read => "read",
        }
    }
}

/// May `caller` have `access` to `key`, given the global `admins`?
pub fn allowed(caller: &Caller, key: &KeyRecord, admins: &[Principal], access: Access) -> bool {
    if caller.internal {
        return match &caller.scope {
            None => true,
            Some(only) => {
                access == Access::Use && (key.id.to_string() == *only || key.name.as_deref() == Some(only.as_str()))
            }
        };
    }
    let can_use = key.policy.public_use || caller.matches(&key.policy.users);
    let can_admin = caller.matches(&key.policy.admins) || caller.matches(admins);
    match access {
        Access::Use => can_use,
        Access::Admin => can_admin,
        Access::Read => can_use || can_admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::model::RotationSchedule;
    use kms_client::proto::KeyKind;
    use uuid::Uuid;

    fn key_owned_by(uid: u32) -> KeyRecord {
        let mut k = KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::Customer,
            "z",
            RotationSchedule::every(365, 0),
            0,
        );
        k.policy.users = vec![Principal::Uid(uid)];
        k.policy.admins = vec![Principal::Uid(uid)];
        k
    }

    #[test]
    fn owner_uses_and_administers_others_do_not() {
        let k = key_owned_by(1000);
        let owner = Caller::process(1000, 1000, None);
        let other = Caller::process(1001, 1001, None);
        for a in [Access::Use, Access::Admin, Access::Read] {
            assert!(allowed(&owner, &k, &[], a));
            assert!(!allowed(&other, &k, &[], a));
        }
    }

    #[test]
    fn global_admin_administers_but_does_not_use() {
        let k = key_owned_by(1000);
        let admin = Caller::process(0, 0, None);
        let admins = [Principal::Uid(0)];
        assert!(allowed(&admin, &k, &admins, Access::Admin));
        assert!(allowed(&admin, &k, &admins, Access::Read));
        assert!(!allowed(&admin, &k, &admins, Access::Use));
    }

    #[test]
    fn groups_match_primary_and_supplementary() {
        let mut k = key_owned_by(1000);
        k.policy.users.push(Principal::Gid(50));
        assert!(allowed(&Caller::process(7, 50, None), &k, &[], Access::Use));
        let mut c = Caller::process(7, 8, None);
        c.groups = vec![50];
        assert!(allowed(&c, &k, &[], Access::Use));
        assert!(!allowed(&c, &k, &[], Access::Admin));
    }

    #[test]
    fn public_use_and_internal() {
        let mut k = key_owned_by(1000);
        k.policy.public_use = true;
        let anyone = Caller::process(4242, 4242, None);
        assert!(allowed(&anyone, &k, &[], Access::Use));
        assert!(!allowed(&anyone, &k, &[], Access::Admin));
        assert!(allowed(&Caller::internal(), &k, &[], Access::Admin));
    }
}

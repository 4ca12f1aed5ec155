//! Rendering of responses: human-readable text or JSON. Pure functions
//! from response objects to strings; printing happens in `commands`.

use std::fmt::Write as _;

use kms_client::proto::{
    fmt_time, FsRewrapInfo, FsVersionsInfo, KeyInfo, KeyRole, RotationEntry, StatusInfo, StoreStatusInfo,
};
use serde::Serialize;

/// How to render responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

/// Renders `value` as pretty JSON or with `human`; always ends in a newline.
pub fn render<T: Serialize + ?Sized>(format: Format, value: &T, human: impl FnOnce(&T) -> String) -> String {
    match format {
        Format::Json => json(value),
        Format::Human => human(value),
    }
}

/// Pretty JSON with a trailing newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    // Response types are plain data (string keys only): serializing cannot fail.
    let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    out.push('\n');
    out
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A key's name, or its id when it has none.
pub fn label(key: &KeyInfo) -> String {
    key.name.clone().unwrap_or_else(|| key.id.to_string())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".to_owned())
}

/// What `kmsctl status` shows: the daemon's status and its key store's.
#[derive(Debug, Serialize)]
pub struct FullStatus {
    #[serde(flatten)]
    pub status: StatusInfo,
    /// `None` from a kmsd that does not report it.
    pub store: Option<StoreStatusInfo>,
}

/// `kmsctl status`.
pub fn status(full: &FullStatus) -> String {
    let s = &full.status;
    let uptime = humantime::format_duration(std::time::Duration::from_secs(s.uptime_secs));
    let mut out = format!(
        "server:      {}\nzone:        {}\nuptime:      {uptime}\nkeys:        {}\nconnections: {}\n",
        s.server, s.zone, s.keys, s.connections
    );
    if s.mounts.is_empty() {
        out.push_str("mounts:      none\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .mounts
            .iter()
            .map(|m| vec![m.target.clone(), m.source.clone(), m.key.clone()])
            .collect();
        out.push_str("mounts:\n");
        out.push_str(&indent(&table(&["TARGET", "SOURCE", "KEY"], &rows)));
    }
    if let Some(store) = &full.store {
        let health = store
            .problem
            .as_deref()
            .map_or("ok".to_string(), |p| format!("unavailable: {p}"));
        out.push_str(&format!("store:       {} ({health})\n", store.backend));
        let leads = if store.leader {
            "yes"
        } else {
            "no (another daemon of the zone does)"
        };
        out.push_str(&format!("scheduler:   {leads}\n"));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `kmsctl key describe`: fields, rotation block, policy, replicas, versions.
pub fn key(k: &KeyInfo) -> String {
    let mut out = String::new();
    let fields = [
        ("id", k.id.to_string()),
        ("name", or_dash(k.name.clone())),
        ("description", k.description.clone()),
        ("kind", k.kind.to_string()),
        ("zone", k.zone.clone()),
        ("role", k.role.to_string()),
        ("primary zone", primary_zone(k)),
        ("state", k.state.to_string()),
        ("created", fmt_time(k.created_at)),
        ("active version", k.active_version.to_string()),
    ];
    for (name, value) in fields {
        let _ = writeln!(out, "{:<16}{value}", format!("{name}:"));
    }
    out.push_str(&rotation_block(k));
    out.push_str(&policy_block(k));
    out.push_str(&replicas_block(k));
    out.push_str("versions:\n");
    let rows: Vec<Vec<String>> = k
        .versions
        .iter()
        .map(|v| vec![v.version.to_string(), fmt_time(v.created_at), v.origin.to_string()])
        .collect();
    out.push_str(&indent(&table(&["VERSION", "CREATED", "ORIGIN"], &rows)));
    out
}

fn rotation_block(k: &KeyInfo) -> String {
    let r = &k.rotation;
    let period = r.period_days.map(|d| format!("{d} days"));
    let next = r.next_rotation_at.map(fmt_time);
    format!(
        "rotation:\n  enabled:          {}\n  period:           {}\n  next rotation:    {}\n  manual rotations: {} of {}\n",
        yes_no(r.enabled),
        or_dash(period),
        or_dash(next),
        r.manual_used,
        r.manual_limit
    )
}

fn policy_block(k: &KeyInfo) -> String {
    let join = |ps: &[kms_client::proto::Principal]| {
        let v: Vec<String> = ps.iter().map(ToString::to_string).collect();
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    let p = &k.policy;
    let users = if p.public_use {
        "anyone".to_owned()
    } else {
        join(&p.users)
    };
    format!(
        "policy:\n  users:            {users}\n  admins:           {}\n",
        join(&p.admins)
    )
}

/// Where the key rotates: its own zone unless it is a replica.
fn primary_zone(k: &KeyInfo) -> String {
    match &k.role {
        KeyRole::SingleZone => "-".to_owned(),
        KeyRole::Primary => k.zone.clone(),
        KeyRole::Replica { primary_zone } => primary_zone.clone(),
    }
}

/// On a primary: each replica's confirmed version and lag in versions. On a
/// replica: the replica zones as last heard from the primary.
fn replicas_block(k: &KeyInfo) -> String {
    if k.replicas.is_empty() {
        return String::new();
    }
    if !matches!(k.role, KeyRole::Primary) {
        let zones: Vec<&str> = k.replicas.iter().map(|r| r.zone.as_str()).collect();
        return format!("replica zones:  {}\n", zones.join(", "));
    }
    let rows: Vec<Vec<String>> = k
        .replicas
        .iter()
        .map(|r| {
            let lag = k.active_version - r.confirmed_version.unwrap_or(0);
            vec![
                r.zone.clone(),
                or_dash(r.confirmed_version.map(|v| v.to_string())),
                lag.to_string(),
            ]
        })
        .collect();
    format!(
        "replicas:\n{}",
        indent(&table(&["ZONE", "CONFIRMED VERSION", "LAG (VERSIONS)"], &rows))
    )
}

/// `kmsctl key list`.
pub fn key_list(keys: &[KeyInfo]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                or_dash(k.name.clone()),
                k.kind.to_string(),
                k.state.to_string(),
                k.active_version.to_string(),
                rotation_summary(k),
            ]
        })
        .collect();
    table(&["ID", "NAME", "KIND", "STATE", "VERSION", "ROTATION"], &rows)
}

fn rotation_summary(k: &KeyInfo) -> String {
    match (k.rotation.enabled, k.rotation.period_days) {
        (true, Some(d)) => format!("every {d} days"),
        (true, None) => "on".to_owned(),
        (false, _) => "off".to_owned(),
    }
}

/// `kmsctl key rotations`.
pub fn rotations(entries: &[RotationEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| vec![e.version.to_string(), fmt_time(e.at), e.origin.to_string()])
        .collect();
    table(&["VERSION", "TIME", "ORIGIN"], &rows)
}

/// A key change (`enable`, `rotate`, ...): what was done and the key's
/// resulting state when the daemon sent it.
pub fn key_change(action: &str, key_arg: &str, info: Option<&KeyInfo>) -> String {
    match info {
        Some(k) => format!(
            "{}: {action} (state {}, active version {})\n",
            label(k),
            k.state,
            k.active_version
        ),
        None => format!("{key_arg}: {action}\n"),
    }
}

/// JSON for a key change: the key, or `{"ok": true}` when the daemon sent
/// none.
pub fn key_change_json(info: Option<&KeyInfo>) -> String {
    match info {
        Some(k) => json(k),
        None => json(&serde_json::json!({ "ok": true })),
    }
}

/// `kmsctl fs versions`.
pub fn fs_versions(v: &FsVersionsInfo) -> String {
    let rows: Vec<Vec<String>> = v
        .counts
        .iter()
        .map(|(version, files)| {
            let mark = if *version == v.active_version { " (active)" } else { "" };
            vec![format!("{version}{mark}"), files.to_string()]
        })
        .collect();
    let mut out = format!("key: {}\n", v.key_id);
    out.push_str(&table(&["VERSION", "FILES"], &rows));
    if v.unreadable > 0 {
        let _ = writeln!(out, "unreadable headers: {}", v.unreadable);
    }
    out
}

/// `kmsctl fs rewrap`.
pub fn fs_rewrap(r: &FsRewrapInfo) -> String {
    format!(
        "rewrapped: {}\nalready current: {}\nfailed: {}\n",
        r.rewrapped, r.already_current, r.failed
    )
}

/// `audit verify`: `ok: N lines, chain intact`, or each break.
pub fn audit_report(r: &kms_client::audit::Report) -> String {
    if r.is_intact() {
        return format!("ok: {} lines, chain intact\n", r.lines);
    }
    r.breaks.iter().map(|b| format!("{b}\n")).collect()
}

#[cfg(test)]
mod tests {
    use kms_client::proto::{KeyKind, KeyState, Origin, Policy, Principal, RotationInfo, VersionInfo};

    use super::*;

    fn sample() -> KeyInfo {
        KeyInfo {
            id: uuid::Uuid::from_u128(0x1234),
            name: Some("payments".into()),
            description: "card data".into(),
            kind: KeyKind::Customer,
            zone: "eu-1".into(),
            role: KeyRole::SingleZone,
            state: KeyState::Enabled,
            created_at: 0,
            active_version: 2,
            versions: vec![
                VersionInfo {
                    version: 1,
                    created_at: 0,
                    origin: Origin::Initial,
                },
                VersionInfo {
                    version: 2,
                    created_at: 86_400,
                    origin: Origin::Manual,
                },
            ],
            rotation: RotationInfo {
                enabled: true,
                period_days: Some(365),
                next_rotation_at: Some(365 * 86_400),
                manual_used: 1,
                manual_limit: 10,
            },
            policy: Policy {
                users: vec![Principal::Uid(1000)],
                admins: vec![Principal::Uid(1000)],
                public_use: false,
            },
            replicas: vec![],
        }
    }

    #[test]
    fn describe_shows_every_field_and_the_rotation_block() {
        let text = key(&sample());
        for want in [
            "id:             00000000-0000-0000-0000-000000001234",
            "name:           payments",
            "description:    card data",
            "kind:           customer",
            "zone:           eu-1",
            "role:           single-zone",
            "primary zone:   -",
            "state:          enabled",
            "created:        1970-01-01T00:00:00Z",
            "active version: 2",
            "  enabled:          yes",
            "  period:           365 days",
            "  next rotation:    1971-01-01T00:00:00Z",
            "  manual rotations: 1 of 10",
            "  users:            uid:1000",
            "  2        1970-01-02T00:00:00Z  manual",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn describe_shows_replicas_with_confirmed_version_and_lag() {
        let mut k = sample();
        k.role = KeyRole::Primary;
        k.replicas = vec![
            kms_client::proto::ReplicaInfo {
                zone: "eu-2".into(),
                confirmed_version: Some(1),
            },
            kms_client::proto::ReplicaInfo {
                zone: "us-1".into(),
                confirmed_version: None,
            },
        ];
        let text = key(&k);
        assert!(text.contains("primary zone:   eu-1"), "{text}");
        assert!(text.contains("LAG (VERSIONS)"), "{text}");
        let row = text.lines().find(|l| l.contains("eu-2")).unwrap();
        assert!(row.contains(" 1 ") && row.trim_end().ends_with('1'), "{row}");
        let row = text.lines().find(|l| l.contains("us-1")).unwrap();
        assert!(row.contains('-') && row.trim_end().ends_with('2'), "{row}");
        k.role = KeyRole::Replica {
            primary_zone: "eu-1".into(),
        };
        let text = key(&k);
        assert!(text.contains("primary zone:   eu-1"), "{text}");
        assert!(text.contains("replica zones:  eu-2, us-1"), "{text}");
    }

    #[test]
    fn describe_json_is_the_serde_form() {
        let text = render(Format::Json, &sample(), key);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["name"], "payments");
        assert_eq!(value["rotation"]["manual_used"], 1);
        let back: KeyInfo = serde_json::from_value(value).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn list_is_an_aligned_table() {
        let text = key_list(&[sample()]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID "), "{text}");
        assert!(lines[1].contains("payments") && lines[1].contains("every 365 days"));
        assert_eq!(lines[0].find("NAME"), lines[1].find("payments"));
    }

    #[test]
    fn rotations_table_uses_rfc3339() {
        let entries = [RotationEntry {
            version: 1,
            at: 0,
            origin: Origin::Automatic,
        }];
        let text = rotations(&entries);
        assert!(text.contains("1970-01-01T00:00:00Z  automatic"), "{text}");
    }

    #[test]
    fn key_change_without_a_key_names_the_argument() {
        assert_eq!(key_change("disabled", "k1", None), "k1: disabled\n");
        let text = key_change("rotated", "k1", Some(&sample()));
        assert!(text.starts_with("payments: rotated") && text.contains("active version 2"));
        assert_eq!(key_change_json(None).trim(), "{\n  \"ok\": true\n}");
    }
}

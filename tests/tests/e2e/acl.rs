//! Access control, exhaustively (issue 17, item 4): every operation of the
//! protocol, run for real against one daemon as the key's owner, as another
//! plain user, as a global admin (`[access] admins`, not in the key's
//! policy) and as a peer zone's daemon uid (`[[peer]] uid`), each answer
//! compared with the rules of README "Access", and the table printed
//! (`-- --nocapture`).
//!
//! The rules (README "Access" and "Multi-zone keys"):
//! - whoever creates a key may use and administer it;
//! - global admins administer every key but use only keys whose policy
//!   names them;
//! - anyone who can open the socket may use the default key and create keys;
//! - refusals are `permission-denied`;
//! - only a peer zone's uid (`[[peer]] uid`) has replication frames
//!   considered, and only frames that claim that zone.
//!
//! A peer's uid is a plain user for everything but replication frames.
//! Where the README is silent, the expectation is what the code does, and
//! the row says so (`code:` in its note).
//!
//! Callers are played without helper processes: a fresh thread switches its
//! own effective uid and gid with the raw `setresgid`/`setresuid` system
//! calls (per thread on Linux; glibc's wrappers would switch every thread of
//! the test process), connects, and exits. The kernel records the connecting
//! thread's credentials for `SO_PEERCRED`, so the connection is that uid's
//! for its lifetime, and its supplementary groups for `SO_PEERGROUPS`
//! (root's, untouched here; no principal here is a gid).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use kms_client::blob::BlobHeader;
use kms_client::proto::{
    Context, CreateKey, ErrorCode, KeyInfo, KeyRole, KeyState, Op, Origin, Principal, ReplicationFrame, Request,
    Response, DEFAULT_KEY_NAME,
};
use kms_client::{BlockingClient, ClientError};
use kms_tests::{fuse_available, DaemonOptions, TestDaemon, CALL_DEADLINE};
use kmsd::replication::message::{self, Message};
use uuid::Uuid;

/// The uids playing the four callers. None of them is root, the daemon's
/// own uid, so root's rights (uid 0 is zone a's daemon, a peer of zone b)
/// never leak in. Zone b's daemon runs as `PEER`.
const OWNER: u32 = 2001;
const OTHER: u32 = 2002;
const ADMIN: u32 = 2003;
const PEER: u32 = 2004;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Owner,
    Other,
    Admin,
    Peer,
}

impl Who {
    const ALL: [Who; 4] = [Who::Owner, Who::Other, Who::Admin, Who::Peer];

    fn uid(self) -> u32 {
        match self {
            Who::Owner => OWNER,
            Who::Other => OTHER,
            Who::Admin => ADMIN,
            Who::Peer => PEER,
        }
    }
}

/// What a cell expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Answered, and the answer (and its effect) checked out.
    Ok,
    /// `key list` answered, without the key in it.
    Unlisted,
    /// Refused with this code, and nothing changed.
    Code(ErrorCode),
}

const OK: Want = Want::Ok;
const DENIED: Want = Want::Code(ErrorCode::PermissionDenied);

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::Ok => f.write_str("ok"),
            Want::Unlisted => f.write_str("ok, not listed"),
            Want::Code(c) => f.write_str(c.as_str()),
        }
    }
}

/// What a cell got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Is(Want),
    /// An answer that does not fit: a wrong payload, a refusal that changed
    /// something, a transport error.
    Wrong(String),
    /// No FUSE here (never under `CI`).
    Skipped,
}

impl fmt::Display for Got {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Got::Is(w) => w.fmt(f),
            Got::Wrong(why) => write!(f, "WRONG: {why}"),
            Got::Skipped => f.write_str("skipped (no FUSE)"),
        }
    }
}

/// Turns a call's result into a cell: `check` validates a success.
fn judge<T>(r: Result<T, ClientError>, check: impl FnOnce(T) -> Result<(), String>) -> Got {
    match r {
        Ok(v) => match check(v) {
            Ok(()) => Got::Is(Want::Ok),
            Err(why) => Got::Wrong(why),
        },
        Err(ClientError::Server(reply)) => Got::Is(Want::Code(reply.code)),
        Err(e) => Got::Wrong(format!("{e:?}")),
    }
}

fn expect(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

const PLAIN: &[u8] = b"acl table plaintext";
const DEK: [u8; 32] = [7; 32];

fn ctx() -> Context {
    Context::from([("table".to_string(), "acl".to_string())])
}

/// Connects to `socket` as `uid` (gid the same); see the module comment.
fn connect_as(socket: &Path, uid: u32) -> Result<BlockingClient, ClientError> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        const KEEP: libc::c_long = -1;
        let id = libc::c_long::from(uid);
        // SAFETY: plain system calls on this thread's own credentials with
        // integer arguments; KEEP (-1) leaves the real and saved ids as they
        // are, and nothing else of the process is affected. The gid goes
        // first, while the thread is still privileged. The thread ends right
        // after connecting.
        let g = unsafe { libc::syscall(libc::SYS_setresgid, KEEP, id, KEEP) };
        // SAFETY: as above.
        let u = unsafe { libc::syscall(libc::SYS_setresuid, KEEP, id, KEEP) };
        assert_eq!(
            (g, u),
            (0, 0),
            "switching this thread to uid {uid} (the tests run as root)"
        );
        let client = BlockingClient::connect(&socket)?;
        client.set_read_timeout(Some(CALL_DEADLINE))?;
        Ok(client)
    })
    .join()
    .expect("connecting thread")
}

/// The daemon under test (zone a) and what the rows share.
struct Fx {
    a: TestDaemon,
    _b: TestDaemon,
    _site: tempfile::TempDir,
    default_id: Uuid,
    /// The owner's key for rows that only read or use it (never changed).
    shared: KeyInfo,
    /// The owner's key with a replica in zone b.
    replicated: KeyInfo,
    /// `PLAIN` encrypted and `DEK` wrapped under `shared`, by the owner.
    shared_ct: Vec<u8>,
    shared_wrapped: Vec<u8>,
    /// `PLAIN` encrypted under the default key, by the owner.
    default_ct: Vec<u8>,
    /// The mount's target and its key (the owner's), with FUSE.
    mount: Option<(String, KeyInfo)>,
    files: u64,
    seq: AtomicU32,
}

impl Fx {
    fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let site = tempfile::Builder::new().prefix("kmsd-acl-").tempdir().unwrap();
        // Zone b's daemon (uid PEER) makes its socket here too.
        std::fs::set_permissions(site.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let sock = |z: &str| site.path().join(format!("{z}.sock"));
        let opts = |zone: &str, other: &str, other_uid: u32, env: &[(&str, String)]| DaemonOptions {
            zone: zone.into(),
            // Zone b pulls only at start (before it holds anything), so
            // no background frame from b reaches a during the table.
            extra_config: format!(
                "[replication]\npull_interval_secs = 3600\nretry_max_secs = 1\n\
                 [[peer]]\nzone = {other:?}\nsocket = {:?}\nuid = {other_uid}\n",
                sock(other)
            ),
            env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            socket: Some(sock(zone)),
            ..DaemonOptions::default()
        };
        // Zone a: admins are exactly ADMIN (the environment replaces the
        // harness's `admins = ["uid:0"]`); zone b's daemon is uid PEER.
        let mut a = TestDaemon::start_with(opts("a", "b", PEER, &[("KMSD_ACCESS__ADMINS", format!("uid:{ADMIN}"))]));
        // Zone b takes pushes from a's daemon, which runs as root.
        let b = TestDaemon::start_with(DaemonOptions {
            run_as: Some(PEER),
            ..opts("b", "a", 0, &[])
        });

        let mut mount = None;
        let mut files = 0;
        if fuse_available() {
            let fs_key = create_as(&a, OWNER, "fs", None);
            assert!(a.terminate().success());
            let cfg = format!(
                "\n[[mount]]\nsource = {:?}\ntarget = {:?}\nkey = \"fs\"\n",
                a.data(),
                a.mnt()
            );
            let mut text = std::fs::read_to_string(&a.config).unwrap();
            text.push_str(&cfg);
            std::fs::write(&a.config, text).unwrap();
            a.restart();
            for i in 0..3 {
                std::fs::write(a.mnt().join(format!("f{i}")), format!("file {i}")).unwrap();
                files += 1;
            }
            mount = Some((a.mnt().display().to_string(), fs_key));
        }

        let mut owner = client(&a, OWNER);
        let shared = create_as(&a, OWNER, "shared", None);
        let replicated = create_as(&a, OWNER, "replicated", None);
        owner
            .replicate_key("replicated", "b")
            .expect("owner replicates to zone b");
        let shared_ct = owner.encrypt("shared", PLAIN, &ctx()).unwrap();
        let shared_wrapped = owner.wrap("shared", &DEK, &ctx()).unwrap();
        let default_ct = owner.encrypt(DEFAULT_KEY_NAME, PLAIN, &ctx()).unwrap();
        let default_id = owner.describe_key(DEFAULT_KEY_NAME).unwrap().id;
        Fx {
            a,
            _b: b,
            _site: site,
            default_id,
            shared,
            replicated,
            shared_ct,
            shared_wrapped,
            default_ct,
            mount,
            files,
            seq: AtomicU32::new(0),
        }
    }

    fn client(&self, who: Who) -> BlockingClient {
        client(&self.a, who.uid())
    }

    fn owner(&self) -> BlockingClient {
        self.client(Who::Owner)
    }

    /// A new key of the owner's, so that no cell sees another's effects.
    fn fresh(&self, rotation: Option<Option<u32>>) -> KeyInfo {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        create_as(&self.a, OWNER, &format!("k{n}"), rotation)
    }

    /// Runs an administrative `call` as `who` on a fresh key prepared by
    /// `prepare` (as the owner). A success must leave the key as `after`
    /// says; a refusal must leave it exactly as it was.
    fn admin_cell(
        &self,
        who: Who,
        rotation: Option<Option<u32>>,
        prepare: fn(&mut BlockingClient, &str),
        call: fn(&mut BlockingClient, &str) -> Result<(), ClientError>,
        after: fn(&KeyInfo) -> Result<(), String>,
    ) -> Got {
        let k = self.fresh(rotation);
        let name = k.name.clone().unwrap();
        let mut owner = self.owner();
        prepare(&mut owner, &name);
        let before = owner.describe_key(&name).unwrap();
        let got = judge(call(&mut self.client(who), &name), |()| {
            after(&owner.describe_key(&name).unwrap())
        });
        if matches!(got, Got::Is(Want::Code(_))) && owner.describe_key(&name).unwrap() != before {
            return Got::Wrong("refused, yet the key changed".into());
        }
        got
    }

    /// A replication frame from zone b asking a for `key`.
    fn pull_frame(&self, key: Uuid) -> ReplicationFrame {
        message::frame("b", "a", &Message::Pull { key }).unwrap()
    }

    /// Counts per version under the mount, as the owner sees them.
    fn fs_counts(&self, target: &str) -> Vec<(u32, u64)> {
        self.owner().fs_versions(target).unwrap().counts
    }
}

fn client(d: &TestDaemon, uid: u32) -> BlockingClient {
    use std::os::unix::fs::PermissionsExt;
    // As membership of the socket's group would (cf. `kmsctl_as`).
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    connect_as(&d.socket, uid).unwrap_or_else(|e| panic!("connect as uid {uid}: {e:?}"))
}

fn create_as(d: &TestDaemon, uid: u32, name: &str, rotation: Option<Option<u32>>) -> KeyInfo {
    client(d, uid)
        .create_key(CreateKey {
            name: Some(name.into()),
            description: "acl table".into(),
            rotation,
        })
        .unwrap_or_else(|e| panic!("create {name} as uid {uid}: {e}"))
}

/// The owner opens `blob` and must find `want`.
fn opens_to(fx: &Fx, blob: &[u8], want: &[u8]) -> Result<(), String> {
    match fx.owner().decrypt(blob, &ctx()) {
        Ok(p) if p[..] == *want => Ok(()),
        Ok(_) => Err("the blob opens to something else".into()),
        Err(e) => Err(format!("the owner cannot open the blob: {e}")),
    }
}

fn blob_key(blob: &[u8]) -> Option<Uuid> {
    BlobHeader::parse(blob).ok().map(|h| h.key_id)
}

/// One operation (or one case of it) and its expected outcome per caller,
/// in the order of [`Who::ALL`].
struct Row {
    /// The operation of the request.
    op: Op,
    case: &'static str,
    want: [Want; 4],
    /// The rule the expectation comes from.
    rule: &'static str,
    run: fn(&Fx, Who) -> Got,
}

/// `[owner, other, admin, peer]` for the README's two main rules.
const ADMINISTER: [Want; 4] = [OK, DENIED, OK, DENIED];
const USE: [Want; 4] = [OK, DENIED, DENIED, DENIED];
const ANYONE: [Want; 4] = [OK, OK, OK, OK];

fn rows() -> Vec<Row> {
    vec![
        Row {
            op: Op::Hello,
            case: "handshake",
            want: ANYONE,
            rule: "anyone who can open the socket (its group decides)",
            run: |fx, who| {
                judge(connect_as(&fx.a.socket, who.uid()), |c| {
                    expect(c.server_info().zone == "a", || format!("zone {}", c.server_info().zone))
                })
            },
        },
        Row {
            op: Op::Status,
            case: "",
            want: ANYONE,
            rule: "code: no check (README silent); shows key count and mounts to anyone",
            run: |fx, who| {
                judge(fx.client(who).status(), |s| {
                    expect(
                        s.zone == "a" && s.mounts.len() == usize::from(fx.mount.is_some()),
                        || format!("{s:?}"),
                    )
                })
            },
        },
        Row {
            op: Op::CreateKey,
            case: "own key",
            want: ANYONE,
            rule: "anyone may create keys; the creator may use and administer it",
            run: |fx, who| {
                let n = fx.seq.fetch_add(1, Ordering::Relaxed);
                let req = CreateKey {
                    name: Some(format!("new{n}")),
                    ..CreateKey::default()
                };
                judge(fx.client(who).create_key(req), |k| {
                    let me = vec![Principal::Uid(who.uid())];
                    expect(k.policy.users == me && k.policy.admins == me, || {
                        format!("{:?}", k.policy)
                    })
                })
            },
        },
        Row {
            op: Op::DescribeKey,
            case: "customer key",
            want: ADMINISTER,
            rule: "code: read = use or administer (README silent on reading)",
            run: |fx, who| {
                judge(fx.client(who).describe_key("shared"), |k| {
                    expect(k.id == fx.shared.id, || format!("described {}", k.id))
                })
            },
        },
        Row {
            op: Op::DescribeKey,
            case: "default key",
            want: ANYONE,
            rule: "code: anyone may use the default key, so may read it (README silent)",
            run: |fx, who| {
                judge(fx.client(who).describe_key(DEFAULT_KEY_NAME), |k| {
                    expect(k.id == fx.default_id, || format!("described {}", k.id))
                })
            },
        },
        Row {
            op: Op::ListKeys,
            case: "owner's key listed?",
            want: [OK, Want::Unlisted, OK, Want::Unlisted],
            rule: "code: lists the keys the caller may read (README silent)",
            run: |fx, who| match fx.client(who).list_keys() {
                Ok(keys) => {
                    let listed = keys.iter().any(|k| k.id == fx.shared.id);
                    let default = keys.iter().any(|k| k.id == fx.default_id);
                    if !default {
                        Got::Wrong("the default key is not listed".into())
                    } else if listed {
                        Got::Is(Want::Ok)
                    } else {
                        Got::Is(Want::Unlisted)
                    }
                }
                Err(e) => judge(Err::<(), _>(e), |()| Ok(())),
            },
        },
        Row {
            op: Op::EnableKey,
            case: "disabled key",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |o, k| drop(o.disable_key(k).unwrap()),
                    |c, k| c.enable_key(k).map(drop),
                    |k| expect(k.state == KeyState::Enabled, || format!("{}", k.state)),
                )
            },
        },
        Row {
            op: Op::DisableKey,
            case: "",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.disable_key(k).map(drop),
                    |k| expect(k.state == KeyState::Disabled, || format!("{}", k.state)),
                )
            },
        },
        Row {
            op: Op::ScheduleDeletion,
            case: "in 7 days",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.schedule_deletion(k, Some(7)).map(drop),
                    |k| {
                        expect(matches!(k.state, KeyState::PendingDeletion { .. }), || {
                            format!("{}", k.state)
                        })
                    },
                )
            },
        },
        Row {
            op: Op::CancelDeletion,
            case: "pending key",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |o, k| drop(o.schedule_deletion(k, Some(7)).unwrap()),
                    |c, k| c.cancel_deletion(k).map(drop),
                    |k| expect(k.state == KeyState::Disabled, || format!("{}", k.state)),
                )
            },
        },
        Row {
            op: Op::ReplicateKey,
            case: "to zone b",
            want: ADMINISTER,
            rule: "code: replication is administration (README silent)",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.replicate_key(k, "b").map(drop),
                    |k| {
                        let zones: Vec<_> = k
                            .replicas
                            .iter()
                            .map(|r| (r.zone.as_str(), r.confirmed_version))
                            .collect();
                        expect(zones == [("b", Some(1))], || format!("replicas {zones:?}"))
                    },
                )
            },
        },
        Row {
            op: Op::UnreplicateKey,
            case: "from zone b",
            want: ADMINISTER,
            rule: "code: unreplication is administration, on the primary (README silent)",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |o, k| drop(o.replicate_key(k, "b").unwrap()),
                    |c, k| c.unreplicate_key(k, "b").map(drop),
                    |k| {
                        expect(k.replicas.is_empty() && k.role == KeyRole::SingleZone, || {
                            format!("{:?} with replicas {:?}", k.role, k.replicas)
                        })
                    },
                )
            },
        },
        Row {
            op: Op::PromoteKey,
            case: "a key primary in this zone",
            want: [
                Want::Code(ErrorCode::InvalidArgument),
                DENIED,
                Want::Code(ErrorCode::InvalidArgument),
                DENIED,
            ],
            rule: "code: promotion is administration, and only a replica can be promoted (README \"Multi-zone keys\")",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.promote_key(k).map(drop),
                    |k| Err(format!("a primary key was promoted: {:?}", k.role)),
                )
            },
        },
        Row {
            op: Op::RotateKey,
            case: "customer key",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.rotate_key(k).map(drop),
                    |k| expect(k.active_version == 2, || format!("active version {}", k.active_version)),
                )
            },
        },
        Row {
            op: Op::RotateKey,
            case: "default key (the owner column is a plain user here)",
            want: [DENIED, DENIED, Want::Code(ErrorCode::Forbidden), DENIED],
            // The README says both "refusals are permission-denied" and the
            // default key "refuses manual rotation"; it does not say which
            // comes first. The code checks access first.
            rule: "code: access before the platform rule; only an admin reaches `forbidden`",
            run: |fx, who| {
                let before = fx.owner().describe_key(DEFAULT_KEY_NAME).unwrap();
                let got = judge(fx.client(who).rotate_key(DEFAULT_KEY_NAME), |_| Ok(()));
                if fx.owner().describe_key(DEFAULT_KEY_NAME).unwrap() != before {
                    return Got::Wrong("the default key changed".into());
                }
                got
            },
        },
        Row {
            op: Op::ListRotations,
            case: "",
            want: ADMINISTER,
            rule: "code: read = use or administer (README silent on reading)",
            run: |fx, who| {
                judge(fx.client(who).list_rotations("shared"), |r| {
                    let got: Vec<_> = r.iter().map(|e| (e.version, e.origin)).collect();
                    expect(got == [(1, Origin::Initial)], || format!("{got:?}"))
                })
            },
        },
        Row {
            op: Op::EnableRotation,
            case: "period 30",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    Some(None),
                    |_, _| {},
                    |c, k| c.enable_rotation(k, Some(30)).map(drop),
                    |k| {
                        expect(k.rotation.enabled && k.rotation.period_days == Some(30), || {
                            format!("{:?}", k.rotation)
                        })
                    },
                )
            },
        },
        Row {
            op: Op::DisableRotation,
            case: "",
            want: ADMINISTER,
            rule: "owner and global admins administer",
            run: |fx, who| {
                fx.admin_cell(
                    who,
                    None,
                    |_, _| {},
                    |c, k| c.disable_rotation(k).map(drop),
                    |k| expect(!k.rotation.enabled, || format!("{:?}", k.rotation)),
                )
            },
        },
        Row {
            op: Op::Encrypt,
            case: "customer key",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(fx.client(who).encrypt("shared", PLAIN, &ctx()), |b| {
                    opens_to(fx, &b, PLAIN)
                })
            },
        },
        Row {
            op: Op::Decrypt,
            case: "",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(fx.client(who).decrypt(&fx.shared_ct, &ctx()), |p| {
                    expect(p[..] == *PLAIN, || "wrong plaintext".into())
                })
            },
        },
        Row {
            op: Op::Wrap,
            case: "customer key",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| judge(fx.client(who).wrap("shared", &DEK, &ctx()), |b| opens_to(fx, &b, &DEK)),
        },
        Row {
            op: Op::Wrap,
            case: "default key",
            want: ANYONE,
            rule: "anyone may use the default key",
            run: |fx, who| {
                let mut c = fx.client(who);
                judge(c.wrap(DEFAULT_KEY_NAME, &DEK, &ctx()), |b| {
                    expect(blob_key(&b) == Some(fx.default_id), || "not a default-key blob".into())?;
                    let back = c
                        .unwrap(&b, &ctx())
                        .map_err(|e| format!("cannot unwrap it back: {e}"))?;
                    expect(back[..] == DEK, || "unwraps to something else".into())
                })
            },
        },
        Row {
            op: Op::Unwrap,
            case: "",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(fx.client(who).unwrap(&fx.shared_wrapped, &ctx()), |p| {
                    expect(p[..] == DEK, || "wrong data key".into())
                })
            },
        },
        Row {
            op: Op::GenerateDataKey,
            case: "with plaintext",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(fx.client(who).generate_data_key("shared", &ctx(), true), |dk| {
                    let p = dk.plaintext.ok_or("no plaintext")?;
                    expect(p.len() == 32, || format!("{} bytes", p.len()))?;
                    opens_to(fx, &dk.blob, &p)
                })
            },
        },
        Row {
            op: Op::ReEncrypt,
            case: "own blob, same key",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(fx.client(who).re_encrypt(&fx.shared_ct, &ctx(), None, None), |b| {
                    expect(blob_key(&b) == Some(fx.shared.id), || "not under the key".into())?;
                    opens_to(fx, &b, PLAIN)
                })
            },
        },
        Row {
            op: Op::ReEncrypt,
            case: "default blob INTO owner's key",
            want: USE,
            // Every caller may open the source (default key): only the
            // destination decides.
            rule: "the destination must be a key the caller may use",
            run: |fx, who| {
                judge(
                    fx.client(who).re_encrypt(&fx.default_ct, &ctx(), Some("shared"), None),
                    |b| {
                        expect(blob_key(&b) == Some(fx.shared.id), || {
                            "not under the destination".into()
                        })?;
                        opens_to(fx, &b, PLAIN)
                    },
                )
            },
        },
        Row {
            op: Op::ReEncrypt,
            case: "owner's blob into default",
            want: USE,
            rule: "the source must be a key the caller may use",
            run: |fx, who| {
                let r = fx
                    .client(who)
                    .re_encrypt(&fx.shared_ct, &ctx(), Some(DEFAULT_KEY_NAME), None);
                judge(r, |b| {
                    expect(blob_key(&b) == Some(fx.default_id), || {
                        "not under the default key".into()
                    })?;
                    opens_to(fx, &b, PLAIN)
                })
            },
        },
        Row {
            op: Op::WrapBatch,
            case: "2 keys",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(
                    fx.client(who).wrap_batch("shared", &[[1u8; 32], [2; 32]], &ctx()),
                    |bs| {
                        expect(bs.len() == 2, || format!("{} blobs", bs.len()))?;
                        opens_to(fx, &bs[0], &[1; 32])?;
                        opens_to(fx, &bs[1], &[2; 32])
                    },
                )
            },
        },
        Row {
            op: Op::UnwrapBatch,
            case: "2 blobs, per item",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                let blobs = [fx.shared_wrapped.clone(), fx.shared_wrapped.clone()];
                match fx.client(who).unwrap_batch(&blobs, &ctx()) {
                    Ok(items) => {
                        let cells: Vec<Got> = items
                            .into_iter()
                            .map(|i| {
                                judge(i.map_err(ClientError::Server), |p| {
                                    expect(p[..] == DEK, || "wrong data key".into())
                                })
                            })
                            .collect();
                        match &cells[..] {
                            [a, b] if a == b => a.clone(),
                            _ => Got::Wrong(format!("items differ: {cells:?}")),
                        }
                    }
                    Err(e) => Got::Wrong(format!("the batch itself failed: {e}")),
                }
            },
        },
        Row {
            op: Op::GenerateDataKeyBatch,
            case: "2 keys",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(
                    fx.client(who).generate_data_key_batch("shared", 2, &ctx(), true),
                    |dks| {
                        expect(dks.len() == 2, || format!("{} keys", dks.len()))?;
                        for dk in dks {
                            opens_to(fx, &dk.blob, &dk.plaintext.ok_or("no plaintext")?)?;
                        }
                        Ok(())
                    },
                )
            },
        },
        Row {
            op: Op::GenerateDataKeys,
            case: "2 contexts",
            want: USE,
            rule: "admins use only keys whose policy names them",
            run: |fx, who| {
                judge(
                    fx.client(who).generate_data_keys("shared", &[ctx(), ctx()], true),
                    |dks| {
                        expect(dks.len() == 2, || format!("{} keys", dks.len()))?;
                        for dk in dks {
                            opens_to(fx, &dk.blob, &dk.plaintext.ok_or("no plaintext")?)?;
                        }
                        Ok(())
                    },
                )
            },
        },
        Row {
            op: Op::FsVersions,
            case: "the mount's key is the owner's",
            want: ADMINISTER,
            rule: "code: read = use or administer (README silent)",
            run: |fx, who| {
                let Some((target, key)) = &fx.mount else {
                    return Got::Skipped;
                };
                judge(fx.client(who).fs_versions(target), |v| {
                    let n: u64 = v.counts.iter().map(|c| c.1).sum();
                    expect(v.key_id == key.id && n == fx.files && v.unreadable == 0, || {
                        format!("{v:?}")
                    })
                })
            },
        },
        Row {
            op: Op::FsRewrap,
            case: "after a rotation",
            want: ADMINISTER,
            rule: "code: administer (README silent); kmsd re-wraps, the caller sees no key",
            run: |fx, who| {
                let Some((target, key)) = &fx.mount else {
                    return Got::Skipped;
                };
                // A refusal before this cell left the files behind, so
                // "before" is any older version, not necessarily active - 1.
                let mut owner = fx.owner();
                owner.rotate_key("fs").unwrap();
                let active = owner.describe_key("fs").unwrap().active_version;
                let before = fx.fs_counts(target);
                let behind = before.iter().all(|c| c.0 < active);
                if !behind || before.iter().map(|c| c.1).sum::<u64>() != fx.files {
                    return Got::Wrong(format!("before: {before:?}, active {active}"));
                }
                let got = judge(fx.client(who).fs_rewrap(target), |r| {
                    expect(r.rewrapped == fx.files && r.failed == 0, || format!("{r:?}"))?;
                    let now = fx.fs_counts(target);
                    expect(now == [(active, fx.files)], || format!("after: {now:?}"))
                });
                if matches!(got, Got::Is(Want::Code(_))) && fx.fs_counts(target) != before {
                    return Got::Wrong(format!("refused, yet headers moved (key {})", key.id));
                }
                got
            },
        },
        Row {
            op: Op::FsStats,
            case: "",
            want: ANYONE,
            rule: "code: no check (README silent); counters of every mount, as the metrics show them to anyone",
            run: |fx, who| {
                judge(fx.client(who).fs_stats(), |s| {
                    let want: Vec<&str> = fx.mount.iter().map(|(t, _)| t.as_str()).collect();
                    let got: Vec<&str> = s.iter().map(|m| m.mount.as_str()).collect();
                    expect(got == want, || format!("{s:?}"))
                })
            },
        },
        Row {
            op: Op::StoreStatus,
            case: "",
            want: ANYONE,
            rule: "code: no check; the store's kind and health and leadership, as the metrics show them to anyone",
            run: |fx, who| {
                judge(fx.client(who).store_status(), |s| {
                    expect(s.backend == "file" && s.leader && s.problem.is_none(), || {
                        format!("{s:?}")
                    })
                })
            },
        },
        Row {
            op: Op::Backup,
            case: "",
            // The table's admin is a global admin but neither root nor
            // kmsd's user (root's backups: backup.rs).
            want: [DENIED, DENIED, DENIED, DENIED],
            rule:
                "README Backup: global admins that are root or kmsd's user only (a snapshot holds every key's material)",
            run: |fx, who| {
                judge(fx.client(who).backup(), |s| {
                    expect(s.starts_with(b"KMSDSNAP"), || format!("{} bytes", s.len()))
                })
            },
        },
        Row {
            op: Op::Replication,
            case: "pull from zone b",
            want: [DENIED, DENIED, DENIED, OK],
            rule: "only a peer zone's uid has replication frames considered",
            run: |fx, who| {
                let frame = fx.pull_frame(fx.replicated.id);
                judge(fx.client(who).call(Request::Replication(frame)), |r| match r {
                    Response::Replication(answer) => match message::read(&answer) {
                        Ok(Message::Export(e)) if e.id == fx.replicated.id && answer.to_zone == "b" => Ok(()),
                        Ok(m) => Err(format!("answered {m:?}")),
                        Err(e) => Err(format!("answer does not decode: {e}")),
                    },
                    other => Err(format!("answered {}", other.kind_name())),
                })
            },
        },
        Row {
            op: Op::Replication,
            case: "frame claiming zone c",
            want: [DENIED, DENIED, DENIED, DENIED],
            rule: "a frame speaks only for the zone of the uid that sent it",
            run: |fx, who| {
                let mut frame = fx.pull_frame(fx.replicated.id);
                frame.from_zone = "c".into();
                judge(fx.client(who).call(Request::Replication(frame)), |r| {
                    Err(format!("answered {}", r.kind_name()))
                })
            },
        },
    ]
}

/// The operation of every `Request` variant this build knows: variant `i`
/// decoded from `[i, 0, 0, ...]` (all-zero fields: empty strings and lists,
/// `None`, `false`, 0), until an index does not decode. A variant added
/// later shows up here and must get a row.
fn every_op() -> BTreeSet<Op> {
    let mut ops = BTreeSet::new();
    for i in 0u8..=127 {
        let mut bytes = vec![i];
        bytes.extend([0u8; 64]);
        match postcard::take_from_bytes::<Request>(&bytes) {
            Ok((req, _)) => assert!(ops.insert(req.op()), "variant {i} repeats {}", req.op()),
            Err(_) => break,
        }
    }
    assert_eq!(ops.len(), Op::ALL.len(), "decoded only {ops:?}");
    ops
}

#[test]
fn every_operation_as_owner_other_user_global_admin_and_peer() {
    let started = Instant::now();
    let fx = Fx::start();
    let setup = started.elapsed();
    let rows = rows();

    let covered: BTreeSet<_> = rows.iter().map(|r| r.op).collect();
    let all = every_op();
    assert_eq!(
        covered,
        all,
        "every Request variant needs a row (missing {:?}, unknown {:?})",
        all.difference(&covered).collect::<Vec<_>>(),
        covered.difference(&all).collect::<Vec<_>>()
    );

    let mut table = String::from(
        "| op | case | owner | other user | global admin | peer | rule |\n|---|---|---|---|---|---|---|\n",
    );
    let mut mismatches = Vec::new();
    let mut skipped = 0;
    for row in &rows {
        let mut cells = Vec::new();
        for (who, want) in Who::ALL.into_iter().zip(row.want) {
            let got = (row.run)(&fx, who);
            let cell = match &got {
                Got::Is(w) if *w == want => got.to_string(),
                Got::Skipped => {
                    skipped += 1;
                    got.to_string()
                }
                _ => {
                    mismatches.push(format!("{} ({}) as {who:?}: want {want}, got {got}", row.op, row.case));
                    format!("**{got}** (want {want})")
                }
            };
            cells.push(cell);
        }
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.op,
            row.case,
            cells.join(" | "),
            row.rule
        ));
    }
    let elapsed = started.elapsed();
    println!(
        "{table}\n{} rows, {} cells ({skipped} skipped), setup {setup:.1?}, total {elapsed:.1?}",
        rows.len(),
        rows.len() * 4
    );
    assert!(
        mismatches.is_empty(),
        "{} cells disagree with the rules:\n{}\n\n{table}\n{}",
        mismatches.len(),
        mismatches.join("\n"),
        fx.a.logs()
    );
}

//! Registry tests against real SQLite files: migrations, revision bumps, uniqueness,
//! revocation, newer-schema and garbage-file refusal, snapshots.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use common::{key, tempdir};
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::{AppProtocol, AppRecord, GrantRecord};
use postern_controller::registry::{Registry, RegistryError};
use postern_controller::schema::{SchemaError, LATEST_VERSION};

fn pk(i: u32) -> DevicePublicKey {
    DevicePublicKey::from_text(&key(i)).unwrap()
}

fn user_version(path: &std::path::Path) -> u32 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn fresh_database_is_migrated_with_durable_settings() {
    let (_dir, db) = tempdir();
    let reg = Registry::open(&db).unwrap();
    assert_eq!(
        reg.revision().unwrap(),
        1,
        "a fresh registry starts at revision 1"
    );
    let (mode, sync, fk) = reg.settings().unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL");
    assert!(fk);
    drop(reg);
    assert_eq!(user_version(&db), LATEST_VERSION);
    // Reopening is a no-op migration and keeps the data.
    let reg = Registry::open(&db).unwrap();
    assert_eq!(reg.revision().unwrap(), 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn empty_file_is_migrated_from_version_zero() {
    let (_dir, db) = tempdir();
    std::fs::write(&db, b"").unwrap();
    let reg = Registry::open(&db).unwrap();
    assert_eq!(reg.revision().unwrap(), 1);
    assert_eq!(user_version(&db), LATEST_VERSION);
}

#[test]
fn parent_directory_is_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a/b/registry.db");
    Registry::open(&db).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("a/b"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn every_write_bumps_revision_once_and_noops_do_not() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    let r0 = reg.revision().unwrap();
    reg.add_device("laptop", "alice", &pk(1)).unwrap();
    assert_eq!(reg.revision().unwrap(), r0 + 1);
    reg.add_app("web", AppProtocol::Tcp, 443).unwrap();
    assert_eq!(reg.revision().unwrap(), r0 + 2);
    let g = reg.add_grant("web", "alice").unwrap();
    assert!(!g.already_granted);
    assert_eq!(reg.revision().unwrap(), r0 + 3);
    let g = reg.add_grant("web", "alice").unwrap();
    assert!(g.already_granted);
    assert_eq!(
        reg.revision().unwrap(),
        r0 + 3,
        "repeated grant changes nothing"
    );
    let o = reg.revoke_device("laptop").unwrap();
    assert!(!o.already_revoked && o.device.revoked);
    assert_eq!(reg.revision().unwrap(), r0 + 4);
    let o = reg.revoke_device("laptop").unwrap();
    assert!(o.already_revoked);
    assert_eq!(
        reg.revision().unwrap(),
        r0 + 4,
        "second revoke changes nothing"
    );
    // Failed writes leave the revision alone.
    assert!(reg.add_device("laptop", "bob", &pk(2)).is_err());
    assert!(reg.add_grant("nope", "alice").is_err());
    assert_eq!(reg.revision().unwrap(), r0 + 4);
    // A second connection (another process in real life) sees the same counter.
    assert_eq!(Registry::open(&db).unwrap().revision().unwrap(), r0 + 4);
}

#[test]
fn device_name_and_key_are_unique() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    let rec = reg.add_device("laptop", "alice", &pk(1)).unwrap();
    assert_eq!(rec.id, pk(1).device_id().to_string());
    assert_eq!(rec.id.len(), 32);
    let e = reg.add_device("laptop", "bob", &pk(2)).unwrap_err();
    assert!(
        matches!(e, RegistryError::DuplicateDeviceName { .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "device name \"laptop\" already exists: pick another name or revoke the old device"
    );
    assert!(e.is_validation());
    let e = reg.add_device("phone", "alice", &pk(1)).unwrap_err();
    assert!(matches!(e, RegistryError::DuplicateDeviceKey { .. }), "{e}");
    assert!(e.to_string().contains("laptop"));
    reg.revoke_device("laptop").unwrap();
    let e = reg.add_device("laptop", "alice", &pk(3)).unwrap_err();
    assert!(
        matches!(e, RegistryError::DeviceNameHeldByRevoked { .. }),
        "{e}"
    );
    assert!(matches!(
        reg.add_device("bad name", "alice", &pk(4)),
        Err(RegistryError::InvalidName(_))
    ));
    assert!(matches!(
        reg.add_device("ok", "", &pk(4)),
        Err(RegistryError::InvalidName(_))
    ));
}

#[test]
fn app_name_and_protocol_port_are_unique() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    reg.add_app("web", AppProtocol::Tcp, 443).unwrap();
    assert!(matches!(
        reg.add_app("web", AppProtocol::Udp, 53),
        Err(RegistryError::DuplicateApp { .. })
    ));
    let e = reg.add_app("web2", AppProtocol::Tcp, 443).unwrap_err();
    assert!(matches!(e, RegistryError::PortTaken { .. }), "{e}");
    assert!(e.to_string().contains("\"web\""));
    // Same port, other protocol: a different app.
    reg.add_app("quic", AppProtocol::Udp, 443).unwrap();
    assert!(matches!(
        reg.add_app("zero", AppProtocol::Tcp, 0),
        Err(RegistryError::InvalidPort)
    ));
    assert!(matches!(
        reg.add_app("Upper", AppProtocol::Tcp, 1),
        Err(RegistryError::InvalidName(_))
    ));
    assert!(reg.add_app(&"a".repeat(65), AppProtocol::Tcp, 2).is_err());
    reg.add_app(&"a".repeat(64), AppProtocol::Tcp, 3).unwrap();
    assert_eq!(reg.list_apps().unwrap().len(), 3);
}

#[test]
fn revoke_by_name_or_id() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    let a = reg.add_device("a", "alice", &pk(1)).unwrap();
    reg.add_device("b", "bob", &pk(2)).unwrap();
    let o = reg.revoke_device(&a.id).unwrap();
    assert_eq!(o.device.name, "a");
    let o = reg.revoke_device("b").unwrap();
    assert_eq!(o.device.user, "bob");
    assert!(reg.list_devices().unwrap().iter().all(|d| d.record.revoked));
    let e = reg.revoke_device("c").unwrap_err();
    assert!(matches!(e, RegistryError::UnknownDevice(_)));
    assert!(e.is_validation());
}

#[test]
fn grants_need_a_known_app() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    let e = reg.add_grant("web", "alice").unwrap_err();
    assert!(matches!(e, RegistryError::UnknownApp(_)));
    assert!(e
        .to_string()
        .starts_with("--app \"web\" is not a registered app"));
    reg.add_app("web", AppProtocol::Tcp, 443).unwrap();
    reg.add_grant("web", "bob").unwrap();
    reg.add_grant("web", "alice").unwrap();
    assert_eq!(
        reg.list_grants().unwrap(),
        vec![
            GrantRecord {
                app: "web".into(),
                user: "alice".into()
            },
            GrantRecord {
                app: "web".into(),
                user: "bob".into()
            }
        ]
    );
}

#[test]
fn snapshot_matches_rows_and_revision() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).unwrap();
    reg.add_device("z-phone", "alice", &pk(2)).unwrap();
    reg.add_device("a-laptop", "alice", &pk(1)).unwrap();
    reg.add_app("ssh", AppProtocol::Tcp, 22).unwrap();
    reg.add_grant("ssh", "alice").unwrap();
    reg.revoke_device("z-phone").unwrap();
    let s = reg.snapshot().unwrap();
    assert_eq!(s.revision, reg.revision().unwrap());
    assert_eq!(s.revision, 6);
    let names: Vec<_> = s.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a-laptop", "z-phone"]);
    assert!(s.devices[1].revoked && !s.devices[0].revoked);
    assert_eq!(s.devices[0].public_key, key(1));
    assert_eq!(
        s.devices[0].parsed_key().unwrap().device_id(),
        s.devices[0].parsed_id().unwrap()
    );
    assert_eq!(
        s.apps,
        vec![AppRecord {
            name: "ssh".into(),
            protocol: AppProtocol::Tcp,
            port: 22,
            forward: None,
        }]
    );
    assert_eq!(s.grants.len(), 1);
    // Round-trips through JSON (the sync wire format).
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(
        serde_json::from_str::<postern_controller::proto::snapshot::Snapshot>(&j).unwrap(),
        s
    );
}

#[test]
fn newer_schema_is_refused_and_left_untouched() {
    let (_dir, db) = tempdir();
    {
        let mut reg = Registry::open(&db).unwrap();
        reg.add_app("web", AppProtocol::Tcp, 443).unwrap();
    }
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", LATEST_VERSION + 1)
            .unwrap();
    }
    let e = Registry::open(&db).unwrap_err();
    match &e {
        RegistryError::Schema {
            source: SchemaError::TooNew { found, supported },
            ..
        } => {
            assert_eq!(*found, LATEST_VERSION + 1);
            assert_eq!(*supported, LATEST_VERSION);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("newer than this binary supports"), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert!(!e.is_validation());
    // Not reset: version and data are still there.
    assert_eq!(user_version(&db), LATEST_VERSION + 1);
    let c = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM apps", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn garbage_file_is_refused_naming_the_path() {
    let (_dir, db) = tempdir();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&db, &garbage).unwrap();
    let e = Registry::open(&db).unwrap_err();
    assert!(matches!(e, RegistryError::NotADatabase { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert!(msg.contains("not an SQLite database"), "{msg}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "file must not be modified"
    );

    // A text file too.
    std::fs::write(&db, "hello, I am not a database\n".repeat(100)).unwrap();
    assert!(matches!(
        Registry::open(&db),
        Err(RegistryError::NotADatabase { .. })
    ));
}

/// A registry written by the first schema (no forward column) keeps its apps when
/// migrated, and then takes forward targets.
#[test]
fn version_1_registry_is_migrated_to_forward_mode() {
    let (_dir, db) = tempdir();
    {
        // Schema version 1 as it shipped (the tables the migration touches).
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL CHECK (revision >= 0));
             INSERT INTO meta (id, revision) VALUES (1, 5);
             CREATE TABLE devices (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, user TEXT NOT NULL,
                 public_key TEXT NOT NULL UNIQUE, revoked INTEGER NOT NULL DEFAULT 0,
                 created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
             CREATE TABLE apps (name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
                 protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
                 port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535), UNIQUE (protocol, port));
             CREATE TABLE grants (app TEXT NOT NULL REFERENCES apps (name) ON DELETE CASCADE,
                 user TEXT NOT NULL, PRIMARY KEY (app, user));
             INSERT INTO apps (name, protocol, port) VALUES ('ssh', 'tcp', 22);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let mut reg = Registry::open(&db).unwrap();
    assert_eq!(user_version(&db), LATEST_VERSION);
    let apps = reg.list_apps().unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!((apps[0].name.as_str(), apps[0].forward), ("ssh", None));
    let target: std::net::SocketAddr = "10.0.0.5:80".parse().unwrap();
    let rec = reg
        .add_app_forward("wiki", AppProtocol::Tcp, 8443, Some(target))
        .unwrap();
    assert_eq!(rec.forward, Some(target));
    let snap = reg.snapshot().unwrap();
    assert_eq!(snap.app("wiki").and_then(|a| a.forward), Some(target));
    let e = reg
        .add_app_forward(
            "lo",
            AppProtocol::Tcp,
            8444,
            Some("127.0.0.1:80".parse().unwrap()),
        )
        .unwrap_err();
    assert!(matches!(e, RegistryError::InvalidForward(_)), "{e}");
    assert!(e.is_validation());
}

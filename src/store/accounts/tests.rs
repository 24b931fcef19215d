//! Accounts: invites listed and revoked, a refused registration that
//! keeps its invite, deleted accounts whose names stay reserved until the
//! retention period passed (issue 12).

use super::*;

fn db(dir: &std::path::Path) -> sled::Db {
    sled::Config::new().path(dir).open().unwrap()
}

#[test]
fn invites_are_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let a = Accounts::load(&db(dir.path())).unwrap();
    let t1 = a.create_invite(3, Some(1_000)).unwrap();
    let t2 = a.create_invite(1, None).unwrap();
    let mut listed = a.invites().unwrap();
    listed.sort();
    let mut want = vec![(t1.id, 3, Some(1_000)), (t2.id, 1, None)];
    want.sort();
    assert_eq!(listed, want);
    assert!(a.revoke_invite(t1.id).unwrap());
    assert!(!a.revoke_invite(t1.id).unwrap());
    assert_eq!(
        a.register(&t1, "alice", &[1; 32], 0).unwrap(),
        Err(RegisterError::InvalidInvite)
    );
    assert_eq!(a.invites().unwrap(), vec![(t2.id, 1, None)]);
}

/// spec §5.2 `Register`: a refused registration never uses up its invite.
#[test]
fn a_refused_registration_keeps_its_invite() {
    let dir = tempfile::tempdir().unwrap();
    let a = Accounts::load(&db(dir.path())).unwrap();
    let first = a.create_invite(1, None).unwrap();
    a.register(&first, "alice", &[1; 32], 0).unwrap().unwrap();
    let invite = a.create_invite(1, None).unwrap();
    // The key is alice's already.
    assert_eq!(
        a.register(&invite, "bob", &[1; 32], 0).unwrap(),
        Err(RegisterError::KeyInUse)
    );
    assert_eq!(
        a.register(&invite, "alice", &[2; 32], 0).unwrap(),
        Err(RegisterError::NameTaken)
    );
    assert_eq!(
        a.register(&invite, "Bad", &[2; 32], 0).unwrap(),
        Err(RegisterError::InvalidName)
    );
    assert_eq!(a.invites().unwrap(), vec![(invite.id, 1, None)]);
    assert!(a.register(&invite, "bob", &[2; 32], 0).unwrap().is_ok());
}

#[test]
fn a_deleted_accounts_name_is_reserved_then_free() {
    let dir = tempfile::tempdir().unwrap();
    let invite;
    let alice;
    {
        let db = db(dir.path());
        let a = Accounts::load(&db).unwrap();
        invite = a.create_invite(5, None).unwrap();
        alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
        assert!(a.revoke(alice, 10).unwrap());
        assert!(a.delete_user(alice.user, 10).unwrap());
        assert!(!a.delete_user(alice.user, 11).unwrap(), "once");
        db.flush().unwrap();
    }
    let db = db(dir.path());
    let a = Accounts::load(&db).unwrap();
    // Across a restart: unknown to senders, taken for registrations, its
    // key still told it was revoked.
    assert_eq!(a.user_id("alice"), None);
    assert!(a.users().is_empty());
    assert_eq!(a.reserved_names(), vec![("alice".into(), 10)]);
    assert_eq!(
        a.register(&invite, "alice", &[2; 32], 20).unwrap(),
        Err(RegisterError::NameTaken)
    );
    assert_eq!(a.identify(&[1; 32]), Identity::Revoked);
    assert_eq!(a.free_names(10).unwrap(), 0, "not before the cutoff");
    assert_eq!(a.free_names(11).unwrap(), 1);
    assert!(a.reserved_names().is_empty());
    let again = a.register(&invite, "alice", &[2; 32], 30).unwrap().unwrap();
    assert_ne!(again.user, alice.user, "a new account");
    assert_eq!(a.identify(&[1; 32]), Identity::Revoked);
    db.flush().unwrap();
    drop(a);
    let a = Accounts::load(&db).unwrap();
    assert_eq!(a.user_id("alice"), Some(again.user));
    assert_eq!(a.users().len(), 1);
    assert_eq!(a.identify(&[1; 32]), Identity::Revoked);
}

//! Groups and blocks: who is in which group and who is its admin, and who
//! blocks whom (spec §5.8, §12).
//!
//! Both live in `sled` (trees `groups` and `blocks`) and in an index in
//! memory, read at open, so that the loops check and fan out without
//! waiting on the disk. Changes run on the store thread
//! ([`super::engine`]) under the index's write lock, which is held until
//! every notice of the change is queued: a loop that appends a group
//! message takes the read lock first and holds it while it appends
//! ([`super::Store`]'s `append_group`), so in every member device's queue
//! a message sent for version V comes before the notice of the change to
//! V+1, and one sent for V+1 after it. Lock order: this index, then the
//! live queues, then the accounts' index.
//!
//! What it guarantees: every change is checked at the moment it applies
//! (an admin removed a moment before cannot add anyone); a group's
//! version grows by one at every change; when the last admin leaves, the
//! longest-standing member becomes admin; a group with no members left is
//! deleted. What it does not do: know names, devices or connections.
//!
//! Records: `groups`: group id (16 bytes) → [`GroupRecord`] (postcard);
//! `blocks`: blocker ‖ blocked (user ids, 4 bytes each, big-endian) →
//! nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::ids::UserId;
use crate::wire::{ChangeKind, GroupId, MAX_BLOCKED};

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    /// 1 at creation, one more at every change.
    pub version: u64,
    /// When it was created.
    pub created_ms: u64,
    /// (user id, admin), longest-standing first.
    pub members: Vec<(u32, bool)>,
}

/// A group's membership as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// Which group.
    pub id: GroupId,
    /// Its version.
    pub version: u64,
    /// (user, admin), longest-standing first.
    pub members: Vec<(UserId, bool)>,
}

impl GroupView {
    /// Whether `user` is a member.
    pub fn is_member(&self, user: UserId) -> bool {
        self.members.iter().any(|(u, _)| *u == user)
    }

    /// Whether `user` is an admin.
    pub fn is_admin(&self, user: UserId) -> bool {
        self.members.iter().any(|(u, a)| *u == user && *a)
    }
}

/// Limits a change is checked against (spec §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most members of one group.
    pub members: usize,
    /// Most groups one user is in.
    pub per_user: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            members: 256,
            per_user: 100,
        }
    }
}

/// A membership change, as the hub asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChangeOp {
    /// Create the group with the caller as its first admin and these
    /// other members.
    Create {
        /// The other members.
        members: Vec<UserId>,
    },
    /// Add members (admins).
    Add {
        /// Whom.
        users: Vec<UserId>,
    },
    /// Remove members (admins).
    Remove {
        /// Whom.
        users: Vec<UserId>,
    },
    /// The caller leaves.
    Leave,
    /// Make a member an admin (admins).
    Promote {
        /// Whom.
        user: UserId,
    },
}

/// Why a change was refused (an expected outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRefused {
    /// No such group, or the caller or the user named is not a member.
    NotMember,
    /// The caller is not an admin.
    NotAdmin,
    /// The group would have more members than allowed.
    Full,
    /// The caller or a user to be added is in the most groups allowed.
    TooManyGroups,
    /// A group with that id exists.
    Exists,
    /// The caller blocks the most users allowed.
    TooManyBlocked,
    /// The disk is below its free-space floor.
    StorageFull,
}

/// One change as applied, for the notice (user ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedChange {
    /// Who made it.
    pub by: u32,
    /// What.
    pub kind: ChangeKind,
    /// Whom.
    pub users: Vec<u32>,
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The group after it (no members: deleted).
    pub view: GroupView,
    /// The changes (empty: nothing changed; no notice).
    pub changes: Vec<AppliedChange>,
    /// Users taken out, who hear of it too.
    pub gone: Vec<UserId>,
}

#[derive(Default)]
pub(crate) struct Index {
    groups: HashMap<GroupId, GroupRecord>,
    by_user: HashMap<UserId, BTreeSet<GroupId>>,
    blocks: HashMap<UserId, BTreeSet<UserId>>,
}

impl Index {
    /// A group's membership.
    pub fn view(&self, id: GroupId) -> Option<GroupView> {
        self.groups.get(&id).map(|g| view_of(id, g))
    }

    /// The groups `user` is in, with their versions, by id.
    pub fn groups_of(&self, user: UserId) -> Vec<(GroupId, u64)> {
        self.by_user
            .get(&user)
            .map(|s| {
                s.iter()
                    .filter_map(|g| self.groups.get(g).map(|r| (*g, r.version)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `blocker` blocks `blocked`.
    pub fn blocks(&self, blocker: UserId, blocked: UserId) -> bool {
        self.blocks.get(&blocker).is_some_and(|s| s.contains(&blocked))
    }

    /// Whom `blocker` blocks, by id.
    pub fn blocked_by(&self, blocker: UserId) -> Vec<UserId> {
        self.blocks
            .get(&blocker)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn count_of(&self, user: UserId) -> usize {
        self.by_user.get(&user).map_or(0, BTreeSet::len)
    }

    /// Applies a change by `by` to `group`, in memory (see
    /// [`Groups::apply`]; the test store uses it alone).
    pub(crate) fn apply(
        &mut self,
        by: UserId,
        group: GroupId,
        change: GroupChangeOp,
        limits: GroupLimits,
        now_ms: u64,
    ) -> Result<Applied, GroupRefused> {
        let index = self;
        let unchanged = |g: &GroupRecord| Applied {
            view: view_of(group, g),
            changes: Vec::new(),
            gone: Vec::new(),
        };
        let mut record = match (index.groups.get(&group), &change) {
            (Some(g), GroupChangeOp::Create { .. }) => {
                // A retry of the creation answers the group as it is.
                return if g.members.first().is_some_and(|m| m.0 == by.0) {
                    Ok(unchanged(g))
                } else {
                    Err(GroupRefused::Exists)
                };
            }
            (None, GroupChangeOp::Create { .. }) => GroupRecord {
                version: 0,
                created_ms: now_ms,
                members: Vec::new(),
            },
            (None, _) => return Err(GroupRefused::NotMember),
            (Some(g), _) => g.clone(),
        };
        let member = |r: &GroupRecord, u: UserId| r.members.iter().position(|m| m.0 == u.0);
        let is_admin = |r: &GroupRecord, u: UserId| r.members.iter().any(|m| m.0 == u.0 && m.1);
        if !matches!(change, GroupChangeOp::Create { .. }) && member(&record, by).is_none() {
            return Err(GroupRefused::NotMember);
        }
        let mut changes = Vec::new();
        let mut gone = Vec::new();
        match change {
            GroupChangeOp::Create { members } => {
                let mut all = vec![by];
                for u in members {
                    if !all.contains(&u) {
                        all.push(u);
                    }
                }
                if all.len() > limits.members {
                    return Err(GroupRefused::Full);
                }
                if all.iter().any(|u| index.count_of(*u) >= limits.per_user) {
                    return Err(GroupRefused::TooManyGroups);
                }
                record.members = all.iter().map(|u| (u.0, *u == by)).collect();
                changes.push(AppliedChange {
                    by: by.0,
                    kind: ChangeKind::Created,
                    users: all[1..].iter().map(|u| u.0).collect(),
                });
            }
            GroupChangeOp::Add { users } => {
                if !is_admin(&record, by) {
                    return Err(GroupRefused::NotAdmin);
                }
                let mut new = Vec::new();
                for u in users {
                    if member(&record, u).is_none() && !new.contains(&u) {
                        new.push(u);
                    }
                }
                if new.is_empty() {
                    return Ok(unchanged(&record));
                }
                if record.members.len() + new.len() > limits.members {
                    return Err(GroupRefused::Full);
                }
                if new.iter().any(|u| index.count_of(*u) >= limits.per_user) {
                    return Err(GroupRefused::TooManyGroups);
                }
                record.members.extend(new.iter().map(|u| (u.0, false)));
                changes.push(AppliedChange {
                    by: by.0,
                    kind: ChangeKind::Added,
                    users: new.iter().map(|u| u.0).collect(),
                });
            }
            GroupChangeOp::Remove { users } => {
                if !is_admin(&record, by) {
                    return Err(GroupRefused::NotAdmin);
                }
                let out: Vec<UserId> = users
                    .into_iter()
                    .filter(|u| member(&record, *u).is_some())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if out.is_empty() {
                    return Ok(unchanged(&record));
                }
                record.members.retain(|m| !out.iter().any(|u| u.0 == m.0));
                changes.push(AppliedChange {
                    by: by.0,
                    kind: ChangeKind::Removed,
                    users: out.iter().map(|u| u.0).collect(),
                });
                gone = out;
            }
            GroupChangeOp::Leave => {
                record.members.retain(|m| m.0 != by.0);
                changes.push(AppliedChange {
                    by: by.0,
                    kind: ChangeKind::Left,
                    users: vec![by.0],
                });
                gone.push(by);
            }
            GroupChangeOp::Promote { user } => {
                if !is_admin(&record, by) {
                    return Err(GroupRefused::NotAdmin);
                }
                let Some(i) = member(&record, user) else {
                    return Err(GroupRefused::NotMember);
                };
                if record.members[i].1 {
                    return Ok(unchanged(&record));
                }
                record.members[i].1 = true;
                changes.push(AppliedChange {
                    by: by.0,
                    kind: ChangeKind::Promoted,
                    users: vec![user.0],
                });
            }
        }
        // spec §5.8: when the last admin goes, the longest-standing
        // member becomes admin.
        if !record.members.is_empty() && !record.members.iter().any(|m| m.1) {
            record.members[0].1 = true;
            changes.push(AppliedChange {
                by: by.0,
                kind: ChangeKind::Promoted,
                users: vec![record.members[0].0],
            });
        }
        record.version += 1;
        if record.members.is_empty() {
            index.groups.remove(&group);
        } else {
            index.groups.insert(group, record.clone());
        }
        for m in &record.members {
            index.by_user.entry(UserId(m.0)).or_default().insert(group);
        }
        for u in &gone {
            if let Some(s) = index.by_user.get_mut(u) {
                s.remove(&group);
                if s.is_empty() {
                    index.by_user.remove(u);
                }
            }
        }
        Ok(Applied {
            view: view_of(group, &record),
            changes,
            gone,
        })
    }

    /// Records that `blocker` blocks `blocked` (or no longer does), in
    /// memory. Returns whether it changed.
    pub(crate) fn block(&mut self, blocker: UserId, blocked: UserId, on: bool) -> Result<bool, GroupRefused> {
        if on {
            let set = self.blocks.entry(blocker).or_default();
            if set.contains(&blocked) {
                return Ok(false);
            }
            if set.len() >= MAX_BLOCKED {
                return Err(GroupRefused::TooManyBlocked);
            }
            set.insert(blocked);
        } else {
            let Some(set) = self.blocks.get_mut(&blocker) else {
                return Ok(false);
            };
            if !set.remove(&blocked) {
                return Ok(false);
            }
            if set.is_empty() {
                self.blocks.remove(&blocker);
            }
        }
        Ok(true)
    }
}

fn view_of(id: GroupId, g: &GroupRecord) -> GroupView {
    GroupView {
        id,
        version: g.version,
        members: g.members.iter().map(|&(u, a)| (UserId(u), a)).collect(),
    }
}

fn block_key(blocker: UserId, blocked: UserId) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&blocker.0.to_be_bytes());
    k[4..].copy_from_slice(&blocked.0.to_be_bytes());
    k
}

/// Groups and blocks, with their index.
pub struct Groups {
    groups: sled::Tree,
    blocks: sled::Tree,
    index: RwLock<Index>,
}

impl Groups {
    pub(crate) fn load(db: &sled::Db) -> Result<Groups, StoreError> {
        let groups = db.open_tree("groups")?;
        let blocks = db.open_tree("blocks")?;
        let mut index = Index::default();
        for item in groups.iter() {
            let (k, v) = item?;
            let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("groups/key"))?;
            let record: GroupRecord = postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt("groups"))?;
            for &(u, _) in &record.members {
                index.by_user.entry(UserId(u)).or_default().insert(GroupId(id));
            }
            index.groups.insert(GroupId(id), record);
        }
        for item in blocks.iter() {
            let (k, _) = item?;
            let (Some(a), Some(b)) = (super::be_u32(&k), k.get(4..).and_then(super::be_u32)) else {
                return Err(StoreError::Corrupt("blocks"));
            };
            index.blocks.entry(UserId(a)).or_default().insert(UserId(b));
        }
        Ok(Groups {
            groups,
            blocks,
            index: RwLock::new(index),
        })
    }

    /// The index, to read (taken before the live queues' lock).
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index, to change (the store thread only).
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a change by `by` to `group` under the write lock `index`
    /// (held by the caller until the change's notices are queued), and
    /// writes it. The caller flushes.
    ///
    /// # Errors
    /// On a database failure; refusals are the inner result.
    pub(crate) fn apply(
        &self,
        index: &mut Index,
        by: UserId,
        group: GroupId,
        change: GroupChangeOp,
        limits: GroupLimits,
        now_ms: u64,
    ) -> Result<Result<Applied, GroupRefused>, StoreError> {
        let applied = match index.apply(by, group, change, limits, now_ms) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if !applied.changes.is_empty() {
            match index.groups.get(&group) {
                Some(record) => {
                    let value = postcard::to_stdvec(record).map_err(|_| StoreError::Corrupt("groups"))?;
                    self.groups.insert(group.0, value)?;
                }
                None => {
                    self.groups.remove(group.0)?;
                }
            }
        }
        Ok(Ok(applied))
    }

    /// Records that `blocker` blocks `blocked` (or no longer does).
    /// Returns whether it changed.
    ///
    /// # Errors
    /// On a database failure; [`GroupRefused::TooManyBlocked`] as the
    /// inner result.
    pub(crate) fn block(
        &self,
        blocker: UserId,
        blocked: UserId,
        on: bool,
    ) -> Result<Result<bool, GroupRefused>, StoreError> {
        let mut index = self.write();
        match index.block(blocker, blocked, on) {
            Ok(true) => {}
            other => return Ok(other),
        }
        let key = block_key(blocker, blocked);
        if on {
            self.blocks.insert(key, &[][..])?;
        } else {
            self.blocks.remove(key)?;
        }
        Ok(Ok(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Groups) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        let g = Groups::load(&db).unwrap();
        (dir, g)
    }

    const G: GroupId = GroupId([7; 16]);
    const LIMITS: GroupLimits = GroupLimits {
        members: 4,
        per_user: 2,
    };

    fn apply(g: &Groups, by: u32, change: GroupChangeOp) -> Result<Applied, GroupRefused> {
        let mut index = g.write();
        g.apply(&mut index, UserId(by), G, change, LIMITS, 5).unwrap()
    }

    fn ids(v: &[u32]) -> Vec<UserId> {
        v.iter().map(|&u| UserId(u)).collect()
    }

    #[test]
    fn the_creator_is_admin_and_only_admins_change_the_membership() {
        let (_d, g) = open();
        let a = apply(&g, 1, GroupChangeOp::Create { members: ids(&[2, 3]) }).unwrap();
        assert_eq!(a.view.version, 1);
        assert_eq!(
            a.view.members,
            vec![(UserId(1), true), (UserId(2), false), (UserId(3), false)]
        );
        assert_eq!(a.changes[0].kind, ChangeKind::Created);
        // A retry by the creator answers the group; anyone else: exists.
        assert!(
            apply(&g, 1, GroupChangeOp::Create { members: vec![] })
                .unwrap()
                .changes
                .is_empty()
        );
        assert_eq!(
            apply(&g, 2, GroupChangeOp::Create { members: vec![] }),
            Err(GroupRefused::Exists)
        );
        assert_eq!(
            apply(&g, 2, GroupChangeOp::Add { users: ids(&[4]) }),
            Err(GroupRefused::NotAdmin)
        );
        assert_eq!(apply(&g, 9, GroupChangeOp::Leave), Err(GroupRefused::NotMember));
        assert_eq!(
            apply(&g, 1, GroupChangeOp::Promote { user: UserId(9) }),
            Err(GroupRefused::NotMember)
        );
        let a = apply(&g, 1, GroupChangeOp::Add { users: ids(&[4, 2]) }).unwrap();
        assert_eq!((a.view.version, a.changes[0].users.clone()), (2, vec![4]));
        assert_eq!(
            apply(&g, 1, GroupChangeOp::Add { users: ids(&[5]) }),
            Err(GroupRefused::Full)
        );
        // Adding a member again changes nothing, not even the version.
        let a = apply(&g, 1, GroupChangeOp::Add { users: ids(&[4]) }).unwrap();
        assert!(a.changes.is_empty());
        assert_eq!(a.view.version, 2);
        let a = apply(&g, 1, GroupChangeOp::Remove { users: ids(&[3, 3, 8]) }).unwrap();
        assert_eq!((a.view.version, a.gone.clone()), (3, ids(&[3])));
        assert!(!g.read().view(G).unwrap().is_member(UserId(3)));
        assert!(g.read().groups_of(UserId(3)).is_empty());
    }

    #[test]
    fn when_the_last_admin_leaves_the_longest_standing_member_becomes_admin() {
        let (_d, g) = open();
        apply(&g, 1, GroupChangeOp::Create { members: ids(&[2, 3]) }).unwrap();
        apply(&g, 1, GroupChangeOp::Promote { user: UserId(3) }).unwrap();
        let a = apply(&g, 1, GroupChangeOp::Leave).unwrap();
        assert_eq!(a.changes.len(), 1, "3 is still admin");
        let a = apply(&g, 3, GroupChangeOp::Leave).unwrap();
        assert_eq!(a.view.members, vec![(UserId(2), true)]);
        assert_eq!(a.changes[1].kind, ChangeKind::Promoted);
        let a = apply(&g, 2, GroupChangeOp::Leave).unwrap();
        assert!(a.view.members.is_empty());
        assert!(g.read().view(G).is_none(), "deleted with its last member");
    }

    #[test]
    fn groups_per_user_are_limited_and_everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let g = Groups::load(&db).unwrap();
            let mut index = g.write();
            for n in 0..2u8 {
                g.apply(
                    &mut index,
                    UserId(1),
                    GroupId([n; 16]),
                    GroupChangeOp::Create { members: ids(&[2]) },
                    LIMITS,
                    1,
                )
                .unwrap()
                .unwrap();
            }
            let r = g
                .apply(
                    &mut index,
                    UserId(3),
                    GroupId([9; 16]),
                    GroupChangeOp::Create { members: ids(&[2]) },
                    LIMITS,
                    1,
                )
                .unwrap();
            assert_eq!(r, Err(GroupRefused::TooManyGroups));
            drop(index);
            assert_eq!(g.block(UserId(1), UserId(2), true).unwrap(), Ok(true));
            assert_eq!(g.block(UserId(1), UserId(2), true).unwrap(), Ok(false));
            db.flush().unwrap();
        }
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let g = Groups::load(&db).unwrap();
        assert_eq!(g.read().groups_of(UserId(2)).len(), 2);
        assert!(g.read().blocks(UserId(1), UserId(2)));
        assert!(!g.read().blocks(UserId(2), UserId(1)));
        assert_eq!(g.block(UserId(1), UserId(2), false).unwrap(), Ok(true));
        assert!(g.read().blocked_by(UserId(1)).is_empty());
    }
}

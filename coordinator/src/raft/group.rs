//! Which coordinator group this coordinator belongs to, and re-forming a group from one
//! survivor after the majority is lost for good (`pgquorum raft force-new-group`).
//!
//! A group is named by a [`GroupId`]: generation 0 is the group formed from
//! `initial_members`; each forced re-forming makes generation + 1. Every Raft message
//! carries the sender's group and a coordinator refuses messages from another one, so
//! the old majority, should it come back, can neither replicate to nor elect with the
//! new group. A coordinator refused by a *newer* generation learns that its group was
//! replaced: it marks itself superseded (persisted), grants no lease and vouches for no
//! endpoint map from then on, and says how to re-add it (empty data directory).
//!
//! What this cannot do: an old majority that returns *without* reaching the new group
//! forms the old group again. That is the risk the operator accepts by name; the
//! runbook (docs/regions.md) says to keep the lost region's coordinators down, or wipe
//! them, until they can be re-added.
//!
//! Storage: the sled tree `group`, keys `id` (this node's group, absent on a node that
//! has not joined one yet), `superseded` (why), `reform` (a forced re-forming recorded
//! but not yet carried out: it is done at the next start, before Raft runs) and
//! `audit.<at_ms>` (every re-forming carried out here, kept forever).

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::durable::Durable;
use super::{CoordinatorNode, NodeId};
use crate::{Error, Result};

const KEY_ID: &[u8] = b"id";
const KEY_SUPERSEDED: &[u8] = b"superseded";
const KEY_REFORM: &[u8] = b"reform";
const AUDIT_PREFIX: &str = "audit.";

/// The gRPC metadata key a refusal carries the refusing coordinator's group in.
pub const GROUP_METADATA: &str = "x-pgquorum-group";
/// ... and every group that group replaced, comma-separated.
pub const REPLACED_METADATA: &str = "x-pgquorum-replaced-groups";

/// A coordinator group's name: `g<generation>` for the founding group (generation 0),
/// `g<generation>-c<formed by>-<unix ms>` for one re-formed by force-new-group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupId(String);

impl GroupId {
    pub fn founding() -> GroupId {
        GroupId("g0".into())
    }

    /// The group a forced re-forming by `formed_by` at `at_ms` makes out of `self`.
    pub fn next(&self, formed_by: NodeId, at_ms: u64) -> GroupId {
        GroupId(format!(
            "g{}-c{formed_by}-{at_ms}",
            self.generation().saturating_add(1)
        ))
    }

    pub fn parse(s: &str) -> Option<GroupId> {
        let digits = s.strip_prefix('g')?;
        let generation = digits.split('-').next()?;
        generation.parse::<u64>().ok()?;
        Some(GroupId(s.to_string()))
    }

    pub fn generation(&self) -> u64 {
        self.0
            .strip_prefix('g')
            .and_then(|rest| rest.split('-').next())
            .and_then(|g| g.parse().ok())
            .unwrap_or(0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A forced re-forming: asked for by an operator, carried out at the next start (see
/// [`super::log_store::LogStore::reform`]), then kept as the audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reform {
    pub previous_group: GroupId,
    pub group: GroupId,
    /// The coordinator that becomes the new group's only voter.
    pub formed_by: NodeId,
    pub node: CoordinatorNode,
    /// The voters of the group it replaces, as this coordinator last knew them.
    pub previous_voters: Vec<NodeId>,
    pub actor: String,
    pub reason: String,
    pub at_ms: u64,
    /// Filled in when carried out: the last log index kept (every entry this
    /// coordinator held, committed or not, becomes part of the new group's history).
    #[serde(default)]
    pub last_log_index: Option<u64>,
}

/// What a message from another group means for its sender.
#[derive(Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The receiver's group is newer: the sender's group may have been replaced (if
    /// the receiver's group replaced it: see [`superseded_by`]).
    SenderSuperseded,
    /// The sender's group is as new or newer (an old member re-added without
    /// wiping its data, two survivors each forced a group, a wrong address): refuse,
    /// nothing more.
    Foreign,
}

/// Compares a message's group with the receiver's.
pub fn compare(sender: &GroupId, receiver: &GroupId) -> Option<Mismatch> {
    if sender == receiver {
        None
    } else if receiver.generation() > sender.generation() {
        Some(Mismatch::SenderSuperseded)
    } else {
        Some(Mismatch::Foreign)
    }
}

/// Whether a refusal from a coordinator of group `theirs`, which replaced the groups
/// `replaced`, means that `ours` was replaced: only along the lineage, never because
/// some other lineage's coordinator with a newer generation answered at an old address.
pub fn superseded_by(ours: &GroupId, theirs: &GroupId, replaced: &[GroupId]) -> bool {
    compare(ours, theirs) == Some(Mismatch::SenderSuperseded) && replaced.contains(ours)
}

/// The groups a refusal names as replaced (comma-separated in its metadata).
pub fn parse_replaced(text: &str) -> Vec<GroupId> {
    text.split(',').filter_map(|g| GroupId::parse(g.trim())).collect()
}

/// Why this coordinator's group is known to be replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superseded {
    /// The newer group that refused it.
    pub by: GroupId,
    pub why: String,
}

/// Whether coordinator `me` may re-form the group: only with the risk named, only as a
/// voter, and only while fewer than a majority of `voters` answer (`answered`: the
/// voters other than `me` that did, each in this group and not superseded). A majority
/// that answers can elect a leader itself, and a new group beside it would be a second
/// authority over the same databases. Pure.
///
/// `answered` maps each answering voter to its last log index; one that holds more
/// of the log than this one (`my_last_log_index`) is where to run it instead: the new
/// group starts from the re-forming coordinator's log, and what it lacks is lost.
pub fn may_reform(
    me: NodeId,
    my_last_log_index: u64,
    voters: &std::collections::BTreeSet<NodeId>,
    answered: &std::collections::BTreeMap<NodeId, u64>,
    accept_split_brain_risk: bool,
) -> std::result::Result<(), String> {
    if !accept_split_brain_risk {
        return Err(format!(
            "force-new-group makes coordinator {me} the only voter of a new group built from its own \
             state. If the old group's majority is not really gone (a partition, not a loss), two \
             groups will each decide failovers and each may promote a primary: split brain. Make sure \
             the lost coordinators are down and stay down (or cannot reach any database node), then \
             repeat with --accept-split-brain-risk"
        ));
    }
    if !voters.contains(&me) {
        return Err(format!(
            "coordinator {me} is not a voter of its group (voters {voters:?}); run force-new-group on a \
             surviving voter"
        ));
    }
    let answering: Vec<NodeId> = answered
        .keys()
        .filter(|id| voters.contains(id))
        .copied()
        .collect();
    let reachable = answering.len() + 1;
    if reachable * 2 > voters.len() {
        return Err(format!(
            "{reachable} of the {} voters answer (this one and {answering:?}): a majority, which can elect \
             a leader on its own; force-new-group is for a group that lost its majority for good. See \
             `pgquorum raft status`",
            voters.len()
        ));
    }
    if let Some((id, last)) = answered
        .iter()
        .filter(|(id, _)| voters.contains(id))
        .find(|(_, last)| **last > my_last_log_index)
    {
        return Err(format!(
            "coordinator {id} holds more of the log (last index {last}, this one {my_last_log_index}): \
             run force-new-group there, or what only it holds is lost"
        ));
    }
    Ok(())
}

struct Inner {
    id: Option<GroupId>,
    superseded: Option<Superseded>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Group {
    tree: sled::Tree,
    durable: Durable,
    inner: Arc<Mutex<Inner>>,
}

impl Group {
    /// `initialized`: whether this node's Raft storage holds anything (a vote or a
    /// log); such a node without a stored group is in the founding group (stores from
    /// before groups had names).
    pub fn open(db: &sled::Db, durable: Durable, initialized: bool) -> Result<Group> {
        let tree = db.open_tree("group")?;
        let read = |key: &[u8]| -> Result<Option<Vec<u8>>> { Ok(tree.get(key)?.map(|v| v.to_vec())) };
        let id = match read(KEY_ID)? {
            Some(bytes) => Some(decode::<GroupId>(&bytes)?),
            None if initialized => Some(GroupId::founding()),
            None => None,
        };
        let superseded = read(KEY_SUPERSEDED)?
            .map(|b| decode::<Superseded>(&b))
            .transpose()?;
        Ok(Group {
            tree,
            durable,
            inner: Arc::new(Mutex::new(Inner { id, superseded })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("group lock poisoned")
    }

    /// This coordinator's group; None until it founds or joins one.
    pub fn id(&self) -> Option<GroupId> {
        self.lock().id.clone()
    }

    /// Why this coordinator's group is known to be replaced, if it is.
    pub fn superseded(&self) -> Option<Superseded> {
        self.lock().superseded.clone()
    }

    async fn write(&self, key: &[u8], value: Vec<u8>) -> Result<()> {
        self.tree.insert(key, value)?;
        self.durable.flush(&self.tree).await?;
        Ok(())
    }

    /// Joins `id` (founding, or the first leader that replicates to this new node).
    pub async fn join(&self, id: GroupId) -> Result<()> {
        self.write(KEY_ID, encode(&id)).await?;
        self.lock().id = Some(id);
        Ok(())
    }

    /// Records that a coordinator of a newer group refused this one.
    pub async fn mark_superseded(&self, superseded: Superseded) -> Result<()> {
        if self.superseded().is_some() {
            return Ok(());
        }
        tracing::error!(by = %superseded.by, why = %superseded.why,
            "this coordinator's group was replaced by force-new-group; it grants no lease from now on");
        self.write(KEY_SUPERSEDED, encode(&superseded)).await?;
        self.lock().superseded = Some(superseded);
        Ok(())
    }

    /// Records a re-forming to carry out at the next start.
    pub async fn request_reform(&self, reform: &Reform) -> Result<()> {
        self.write(KEY_REFORM, encode(reform)).await
    }

    pub fn pending_reform(&self) -> Result<Option<Reform>> {
        Ok(self
            .tree
            .get(KEY_REFORM)?
            .map(|b| decode::<Reform>(&b))
            .transpose()?)
    }

    /// After the log was re-formed: the new group becomes this node's, the request
    /// becomes an audit record, all in one durable batch.
    pub async fn reform_done(&self, reform: &Reform) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(KEY_ID, encode(&reform.group));
        batch.insert(
            format!("{AUDIT_PREFIX}{:020}", reform.at_ms).as_bytes(),
            encode(reform),
        );
        batch.remove(KEY_REFORM);
        batch.remove(KEY_SUPERSEDED);
        self.tree.apply_batch(batch)?;
        self.durable.flush(&self.tree).await?;
        let mut inner = self.lock();
        inner.id = Some(reform.group.clone());
        inner.superseded = None;
        Ok(())
    }

    /// Every re-forming carried out on this coordinator, oldest first.
    pub fn audit(&self) -> Result<Vec<Reform>> {
        self.tree
            .scan_prefix(AUDIT_PREFIX)
            .values()
            .map(|v| Ok(decode::<Reform>(&v.map_err(Error::Storage)?)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_order_groups() {
        let g0 = GroupId::founding();
        let g1 = g0.next(4, 1_700_000_000_000);
        assert_eq!(g1.as_str(), "g1-c4-1700000000000");
        assert_eq!(g1.generation(), 1);
        assert_eq!(GroupId::parse(g1.as_str()), Some(g1.clone()));
        assert_eq!(GroupId::parse("x1"), None);
        assert_eq!(GroupId::parse("g"), None);
        assert_eq!(compare(&g0, &g0), None);
        assert_eq!(compare(&g0, &g1), Some(Mismatch::SenderSuperseded));
        assert_eq!(compare(&g1, &g0), Some(Mismatch::Foreign));
        // Superseded only by the group that replaced this one.
        assert!(superseded_by(&g0, &g1, std::slice::from_ref(&g0)));
        assert!(!superseded_by(&g0, &g1, &[]));
        let elsewhere = GroupId::founding().next(9, 9).next(9, 10);
        assert!(!superseded_by(&g1, &elsewhere, &[GroupId::founding().next(9, 9)]));
        assert!(!superseded_by(&g1, &g0, std::slice::from_ref(&g1)));
        // Two re-formings: a g0 coordinator learns from a g2 one.
        let g2 = g1.next(4, 8);
        assert!(superseded_by(&g0, &g2, &parse_replaced(&format!("{g0},{g1}"))));
        // Two re-formings of the same generation (two survivors each forced one):
        // neither supersedes the other; both refuse.
        let other = g0.next(5, 1_700_000_000_001);
        assert_eq!(compare(&g1, &other), Some(Mismatch::Foreign));
    }

    #[test]
    fn reform_only_with_the_risk_named_and_no_majority_answering() {
        let voters: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4, 5].into();
        let at = |pairs: &[(NodeId, u64)]| pairs.iter().copied().collect();
        let none = Default::default();
        let err = may_reform(4, 10, &voters, &none, false).unwrap_err();
        assert!(err.contains("--accept-split-brain-risk"), "{err}");
        // 4 and 5 of 5: a minority; 3 of 5 would be a majority.
        may_reform(4, 10, &voters, &at(&[(5, 10)]), true).unwrap();
        let err = may_reform(4, 10, &voters, &at(&[(5, 10), (1, 3)]), true).unwrap_err();
        assert!(err.contains("3 of the 5 voters answer"), "{err}");
        // Only voters count; a learner answering does not make a majority.
        may_reform(4, 10, &voters, &at(&[(5, 10), (9, 99)]), true).unwrap();
        // A survivor with more of the log is the one to run it on.
        let err = may_reform(4, 10, &voters, &at(&[(5, 11)]), true).unwrap_err();
        assert!(err.contains("coordinator 5 holds more of the log"), "{err}");
        let err = may_reform(9, 10, &voters, &none, true).unwrap_err();
        assert!(err.contains("not a voter"), "{err}");
        // 1 of 2 is not a majority (a 1 + 1 group lost one).
        may_reform(1, 10, &[1, 2].into(), &none, true).unwrap();
        // A group of one answering itself is a majority: nothing to re-form.
        assert!(may_reform(1, 10, &[1].into(), &none, true).is_err());
    }

    #[tokio::test]
    async fn group_survives_reopen_and_reform_becomes_audit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let open = |initialized| {
            let (db, durable) = super::super::durable::test_store_at(&path);
            let group = Group::open(&db, durable, initialized).unwrap();
            (db, group)
        };
        {
            let (_db, g) = open(false);
            assert_eq!(g.id(), None, "a new node has no group until it joins");
        }
        {
            let (_db, g) = open(true);
            assert_eq!(
                g.id(),
                Some(GroupId::founding()),
                "an old store is in the founding group"
            );
            let superseded = Superseded {
                by: GroupId::founding().next(4, 7),
                why: "refused by coordinator 4".into(),
            };
            g.mark_superseded(superseded).await.unwrap();
            let reform = Reform {
                previous_group: GroupId::founding(),
                group: GroupId::founding().next(4, 7),
                formed_by: 4,
                node: CoordinatorNode::default(),
                previous_voters: vec![1, 2, 3, 4, 5],
                actor: "ops".into(),
                reason: "us-east-1 lost".into(),
                at_ms: 7,
                last_log_index: None,
            };
            g.request_reform(&reform).await.unwrap();
        }
        let (_db, g) = open(true);
        assert_eq!(
            g.superseded().map(|s| s.why),
            Some("refused by coordinator 4".into())
        );
        let reform = g
            .pending_reform()
            .unwrap()
            .expect("the request survives a restart");
        g.reform_done(&reform).await.unwrap();
        assert_eq!(g.pending_reform().unwrap(), None);
        assert_eq!(g.superseded(), None);
        assert_eq!(g.id(), Some(reform.group.clone()));
        assert_eq!(g.audit().unwrap(), vec![reform]);
    }
}

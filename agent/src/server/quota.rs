//! Who may hold how much of the agent: connections per uid and in all, with
//! slots kept for root so `amm-agent status` run as root is always served
//! however many clients the users hold. Watches per uid are counted where
//! registrations are checked (`session`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use amm_protocol::Denial;

use super::lock;

/// Connections root may hold beyond `max_clients`.
pub const ROOT_RESERVE: usize = 16;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections of users other than root, all together.
    pub max_clients: usize,
    /// Most connections of one uid other than root.
    pub max_clients_per_uid: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

/// The connection counts.
#[derive(Debug, Default)]
pub struct Quotas {
    counts: Mutex<Counts>,
}

/// A held connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    quotas: Arc<Quotas>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.quotas.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

impl Quotas {
    /// Takes a slot for a connection of `uid`, or says why not.
    pub fn admit(self: &Arc<Self>, uid: u32, limits: Limits) -> Result<Slot, (Denial, String)> {
        let mut c = lock(&self.counts);
        let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
        // --max-clients may be as large as usize::MAX: the reserve saturates
        let root_most = limits.max_clients.saturating_add(ROOT_RESERVE);
        if uid == 0 {
            if c.total >= root_most {
                return Err((
                    Denial::TooManyClients,
                    format!(
                        "the agent serves at most {root_most} clients at once (root included); try again later"
                    ),
                ));
            }
        } else if mine >= limits.max_clients_per_uid {
            return Err((
                Denial::TooManyClients,
                format!(
                    "uid {uid} already holds {mine} connections, the most one user may (--max-clients-per-uid); close idle ones"
                ),
            ));
        } else if c.total >= limits.max_clients {
            return Err((
                Denial::TooManyClients,
                format!(
                    "the agent serves at most {} clients at once; try again later",
                    limits.max_clients
                ),
            ));
        }
        c.total += 1;
        *c.per_uid.entry(uid).or_default() += 1;
        Ok(Slot {
            quotas: self.clone(),
            uid,
        })
    }

    /// Connections held: all of them for root (`uid` 0), else `uid`'s.
    pub fn clients_seen_by(&self, uid: u32) -> usize {
        let c = lock(&self.counts);
        if uid == 0 {
            c.total
        } else {
            c.per_uid.get(&uid).copied().unwrap_or(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_limits_admit_everyone_without_overflow() {
        let q = Arc::new(Quotas::default());
        let limits = Limits {
            max_clients: usize::MAX,
            max_clients_per_uid: usize::MAX,
        };
        let _root = q
            .admit(0, limits)
            .expect("root, with usize::MAX clients allowed");
        let _user = q.admit(1000, limits).expect("a user");
        assert_eq!(q.clients_seen_by(0), 2);
    }

    #[test]
    fn one_user_cannot_take_every_slot_and_root_always_gets_in() {
        let q = Arc::new(Quotas::default());
        let limits = Limits {
            max_clients: 4,
            max_clients_per_uid: 2,
        };
        let a: Vec<Slot> = (0..2).map(|_| q.admit(1000, limits).expect("a")).collect();
        let (code, why) = q.admit(1000, limits).expect_err("a's third");
        assert_eq!(code, Denial::TooManyClients);
        assert!(why.contains("uid 1000"), "{why}");
        let b: Vec<Slot> = (0..2).map(|_| q.admit(1001, limits).expect("b")).collect();
        assert!(q.admit(1002, limits).is_err(), "the agent is full");
        let root: Vec<Slot> = (0..ROOT_RESERVE)
            .map(|_| q.admit(0, limits).expect("root's reserve"))
            .collect();
        assert!(q.admit(0, limits).is_err());
        assert_eq!(q.clients_seen_by(0), 4 + ROOT_RESERVE);
        assert_eq!(q.clients_seen_by(1000), 2);
        drop((a, b, root));
        assert_eq!(q.clients_seen_by(0), 0);
        assert!(q.admit(1002, limits).is_ok());
    }
}

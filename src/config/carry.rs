//! Which routes, upstream groups and backends of one snapshot the next
//! keeps: the one old-to-new map of a reload.
//!
//! The key, in full:
//! - a route is kept when the new config has a route of the same name
//!   (`name`, or the generated `route #N (line L)`);
//! - a group is kept when the new config has a group of the same name;
//! - a backend is kept when its group is kept and the new group has a
//!   backend with the same label: the URL as written (`tcp://app:80`).
//!
//! Everything that follows a backend across a reload reads this map:
//! request and upstream counts (`stats::Tallies`), what a worker learned
//! of it (`balance::GroupView`), active health marks (moved when the
//! snapshot is published, `epoch::Published::publish`) and idle pooled
//! connections (`proxy::pool`). Pooled connections go further only where
//! the peer is the same: a label whose name now resolves elsewhere, or
//! whose TLS name changed, keeps its counts and marks but not its
//! connections.
//!
//! Owns: the key. Does not own: what each user copies.

use std::sync::atomic::Ordering;

use super::Snapshot;

/// A backend of the new snapshot that the old one had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptBackend {
    /// Its index in the old group.
    pub old: usize,
    /// Same address and TLS name: a connection to the old one may serve
    /// the new one.
    pub same_peer: bool,
}

/// The map from an old snapshot to a new one, indexed by the new one's
/// positions.
#[derive(Debug, Default)]
pub struct Carry {
    /// For each new route, the old route's index.
    pub routes: Vec<Option<usize>>,
    /// For each new group, the old group's index.
    pub groups: Vec<Option<usize>>,
    /// For each new group, for each of its backends, the old backend.
    pub backends: Vec<Vec<Option<KeptBackend>>>,
}

impl Carry {
    pub fn between(old: &Snapshot, new: &Snapshot) -> Carry {
        let old_routes = old.rules.routes();
        let routes = new
            .rules
            .routes()
            .iter()
            .map(|r| old_routes.iter().position(|o| o.name == r.name))
            .collect();
        let groups: Vec<Option<usize>> = new
            .upstreams
            .iter()
            .map(|g| old.upstreams.iter().position(|o| o.name == g.name))
            .collect();
        let backends = new
            .upstreams
            .iter()
            .zip(&groups)
            .map(|(g, og)| {
                let og = og.map(|i| &old.upstreams[i]);
                g.backends
                    .iter()
                    .map(|b| {
                        let og = og?;
                        let old = og.backends.iter().position(|o| o.label == b.label)?;
                        let o = &og.backends[old];
                        Some(KeptBackend {
                            old,
                            same_peer: o.addr == b.addr && o.tls_name == b.tls_name,
                        })
                    })
                    .collect()
            })
            .collect();
        Carry {
            routes,
            groups,
            backends,
        }
    }

    /// The old `(group, backend)` of the new group `g`'s backend `b`.
    pub fn backend(&self, g: usize, b: usize) -> Option<(usize, KeptBackend)> {
        Some((self.groups[g]?, self.backends[g][b]?))
    }

    /// Give the new snapshot's backends the old one's active health
    /// marks, before it is published: a backend that checks marked down
    /// is never read as up by a worker on the new snapshot.
    pub fn health_marks(&self, old: &Snapshot, new: &Snapshot) {
        for (g, group) in new.upstreams.iter().enumerate() {
            for (b, backend) in group.backends.iter().enumerate() {
                if let Some((og, kept)) = self.backend(g, b) {
                    let up = old.upstreams[og].backends[kept.old]
                        .healthy
                        .load(Ordering::Relaxed);
                    backend.healthy.store(up, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::epoch::Published;

    fn snapshot(upstreams: &str, routes: &str) -> Snapshot {
        let text = format!("[[listener]]\nlisten = \"127.0.0.1:1\"\n{upstreams}\n{routes}");
        crate::config::parse(&text, "t").expect("valid")
    }

    #[test]
    fn routes_groups_and_backends_are_kept_by_name_and_label() {
        let old = snapshot(
            "[upstream.a]\nbackends = [\"tcp://127.0.0.1:1001\", \"tcp://127.0.0.1:1002\"]\n\
             [upstream.b]\nbackends = [\"tcp://127.0.0.1:2001\"]\n",
            "[[route]]\nname = \"one\"\nupstream = \"a\"\n[[route]]\nname = \"two\"\nupstream = \"b\"\n",
        );
        // Routes reordered, a backend added before a kept one, a group
        // and a route gone, and new ones. (Groups are held sorted by
        // name: `a` stays first.)
        let new = snapshot(
            "[upstream.c]\nbackends = [\"tcp://127.0.0.1:3001\"]\n\
             [upstream.a]\nbackends = [\"tcp://127.0.0.1:1003\", \"tcp://127.0.0.1:1002\"]\n",
            "[[route]]\nname = \"three\"\nupstream = \"c\"\n[[route]]\nname = \"one\"\nupstream = \"a\"\n",
        );
        let carry = Carry::between(&old, &new);
        assert_eq!(carry.routes, [None, Some(0)]);
        assert_eq!(carry.groups, [Some(0), None]);
        let same = |old| {
            Some(KeptBackend {
                old,
                same_peer: true,
            })
        };
        assert_eq!(carry.backends, [vec![None, same(1)], vec![None]]);
        assert_eq!(carry.backend(0, 1), Some((0, same(1).unwrap())));
        assert_eq!(carry.backend(1, 0), None);
    }

    #[test]
    fn a_label_whose_peer_changed_keeps_its_place_but_not_its_peer() {
        // The same label resolving to another address (what DNS does to
        // `tcp://app:80` between two reloads), set by hand here.
        let old = snapshot(
            "[upstream.a]\nbackends = [\"https://127.0.0.1:1443\"]\n",
            "",
        );
        let new = snapshot(
            "[upstream.a]\nbackends = [\"https://127.0.0.1:1443\"]\n",
            "",
        );
        let kept = Carry::between(&old, &new).backends[0][0].expect("kept");
        assert!(kept.same_peer);
        let mut moved = snapshot(
            "[upstream.a]\nbackends = [\"https://127.0.0.1:1443\"]\n",
            "",
        );
        moved.upstreams[0].backends[0].addr =
            crate::config::BackendAddr::Tcp("127.0.0.2:1443".parse().unwrap());
        let kept = Carry::between(&old, &moved).backends[0][0].expect("kept by label");
        assert!(
            !kept.same_peer,
            "a pooled connection would reach the old address"
        );
    }

    #[test]
    fn health_marks_move_with_the_publish() {
        let group =
            "[upstream.a]\nbackends = [\"tcp://127.0.0.1:1001\", \"tcp://127.0.0.1:1002\"]\n";
        let old = Arc::new(snapshot(group, ""));
        old.upstreams[0].backends[1]
            .healthy
            .store(false, Ordering::Relaxed);
        let published = Published::new(old);
        let new = Arc::new(snapshot(group, ""));
        assert!(new.upstreams[0].backends[1].healthy.load(Ordering::Relaxed));
        published.publish(new.clone());
        // Down in the snapshot workers load, from the first moment.
        let (_, current) = published.load();
        assert!(Arc::ptr_eq(&current, &new));
        assert!(!new.upstreams[0].backends[1].healthy.load(Ordering::Relaxed));
        assert!(new.upstreams[0].backends[0].healthy.load(Ordering::Relaxed));
    }
}

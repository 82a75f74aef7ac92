//! Second copies of the tables a live change patches (the FIB and
//! AllowedIPs): at 100,000 routes building one anew costs tens of
//! milliseconds, patching one costs the changed prefixes.
//!
//! The workers read the published copy without locks, so it is never
//! changed in place. The copy they read before the last change is kept
//! instead; once every worker has let go of it (they drop their snapshot
//! at the end of each batch), the next change brings it up to date with
//! the last patch, applies its own and publishes it. The copy it replaces
//! becomes the spare in turn: double buffering, one patch behind.

use crate::fib::{AllowedIps, Fib, FibPatch};
use std::sync::Arc;

/// Drops `what` on a thread of its own: freeing what a change replaced
/// (a config of 10,000 peers, 100,000 routes) is not on the change's
/// time. On the caller's thread if none can start.
pub fn free_elsewhere<T: Send + 'static>(what: T) {
    // If no thread can start, the closure and `what` go with the error.
    let _ = std::thread::Builder::new()
        .name("subway-free".into())
        .spawn(move || drop(what));
}

/// A table that a [`FibPatch`] changes.
pub(crate) trait Patch: Clone {
    fn patch(&mut self, p: &FibPatch);
}

impl Patch for Fib {
    fn patch(&mut self, p: &FibPatch) {
        Fib::patch(self, p)
    }
}

impl Patch for AllowedIps {
    fn patch(&mut self, p: &FibPatch) {
        AllowedIps::patch(self, p)
    }
}

/// The spare copy of one published table.
pub(crate) struct Spare<T> {
    /// The copy: the previous published version (the workers may still
    /// hold it) or a private one.
    copy: Option<Arc<T>>,
    /// What brings `copy` to the published version (None: it equals it).
    behind: Option<FibPatch>,
}

impl<T> Default for Spare<T> {
    fn default() -> Self {
        Spare {
            copy: None,
            behind: None,
        }
    }
}

impl<T: Patch> Spare<T> {
    /// A spare equal to the published table.
    pub fn equal(copy: T) -> Spare<T> {
        Spare {
            copy: Some(Arc::new(copy)),
            behind: None,
        }
    }

    /// A private copy equal to `published`, to patch and publish: the
    /// spare brought up to date, or (none, or a worker still holds it) a
    /// clone, which costs what a build does.
    pub fn take(&mut self, published: &Arc<T>) -> T {
        let behind = self.behind.take();
        if let Some(copy) = self.copy.take()
            && let Ok(mut t) = Arc::try_unwrap(copy)
        {
            if let Some(p) = &behind {
                t.patch(p);
            }
            return t;
        }
        tracing::debug!("no spare table to patch: copying the published one");
        (**published).clone()
    }

    /// `published` changed by `patch`, to publish: the spare brought up
    /// to date and patched, or `published` itself if the patch is empty.
    pub fn patched(&mut self, published: &Arc<T>, patch: &FibPatch) -> Arc<T> {
        if patch.is_empty() {
            return published.clone();
        }
        let mut t = self.take(published);
        t.patch(patch);
        Arc::new(t)
    }

    /// `old`, just replaced by itself patched with `patch`, is the spare.
    pub fn retire(&mut self, old: Arc<T>, patch: FibPatch) {
        self.copy = Some(old);
        self.behind = Some(patch);
    }

    /// The published table was built anew: the spare is no copy of it.
    pub fn clear(&mut self) {
        *self = Spare::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::Target;

    fn fib(routes: &[(&str, Target)]) -> Fib {
        let mut f = Fib::new();
        for (p, t) in routes {
            f.insert(0, p.parse().unwrap(), *t).unwrap();
        }
        f
    }

    fn patch(routes: &[(&str, Option<Target>)]) -> FibPatch {
        FibPatch {
            sets: Vec::new(),
            routes: routes.iter().map(|(p, t)| (0, p.parse().unwrap(), *t)).collect(),
        }
    }

    fn listing(f: &Fib) -> Vec<String> {
        let mut v: Vec<String> = f
            .routes()
            .iter()
            .map(|r| format!("{} {:?}", r.prefix, r.target))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_spare_catches_up_one_patch_behind_and_a_held_one_is_copied() {
        let first = fib(&[("10.1.0.0/24", Target::Peer(1)), ("10.2.0.0/24", Target::Peer(2))]);
        let mut spare = Spare::equal(first.clone());
        let mut published = Arc::new(first);
        // Change 1: the spare equals the published table.
        let p1 = patch(&[("10.2.0.0/24", None), ("10.3.0.0/24", Some(Target::Peer(2)))]);
        let mut next = spare.take(&published);
        next.patch(&p1);
        let old = std::mem::replace(&mut published, Arc::new(next));
        spare.retire(old, p1);
        // Change 2: the spare is the version before change 1, caught up.
        let p2 = patch(&[("10.1.0.0/24", Some(Target::Peer(3)))]);
        let mut next = spare.take(&published);
        next.patch(&p2);
        assert_eq!(
            listing(&next),
            ["10.1.0.0/24 Peer(3)", "10.3.0.0/24 Peer(2)"],
            "caught up with change 1, then change 2"
        );
        assert_eq!(next.lookup(0, "10.2.0.9".parse().unwrap()), None);
        assert_eq!(next.lookup(0, "10.3.0.9".parse().unwrap()), Some((24, Target::Peer(2))));
        let old = std::mem::replace(&mut published, Arc::new(next));
        spare.retire(old, p2);
        // A worker still holds the previous version: the spare is a copy
        // of the published one, not the held one.
        // An empty patch publishes the same table, and takes no spare.
        assert!(Arc::ptr_eq(
            &spare.patched(&published, &FibPatch::default()),
            &published
        ));
        assert!(spare.copy.is_some());
        let held = spare.copy.clone();
        let next = spare.take(&published);
        assert_eq!(listing(&next), listing(&published));
        drop(held);
    }
}

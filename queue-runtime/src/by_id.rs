//! Finding an item of a list by its id without scanning the list: checking a
//! configuration of 49,000 queues took 91 s, each queue's checks scanning the entries
//! and the queues again (review).

use std::collections::HashMap;
use std::sync::Mutex;

/// Where each id is in a list that may still grow or shrink between lookups (the
/// plan's queues while it is made). Taken again when the list's length changed, or
/// when a position no longer holds its id; the first item with an id is the one
/// found, as `iter().find` finds it. An item replaced in place by one of a new id,
/// the length kept, is found only once the positions are taken again: for lists that
/// change by pushes and removals.
///
/// ```
/// use queue_runtime::by_id::ById;
///
/// let index = ById::default();
/// let mut names = vec!["a", "b"];
/// assert_eq!(index.find(&names, "b", |n| n), Some(&"b"));
/// names.push("c");
/// assert_eq!(index.find(&names, "c", |n| n), Some(&"c"));
/// assert_eq!(index.find(&names, "d", |n| n), None);
/// ```
#[derive(Default)]
pub struct ById {
    positions: Mutex<Positions>,
}

#[derive(Default)]
struct Positions {
    /// The list's length when the positions were taken.
    taken_at: usize,
    of: HashMap<String, usize>,
}

impl Positions {
    fn take<T>(&mut self, items: &[T], id_of: &impl Fn(&T) -> &str) {
        self.of.clear();
        for (i, item) in items.iter().enumerate() {
            self.of.entry(id_of(item).to_string()).or_insert(i);
        }
        self.taken_at = items.len();
    }

    fn found<'a, T>(&self, items: &'a [T], id: &str, id_of: &impl Fn(&T) -> &str) -> Option<&'a T> {
        let item = items.get(*self.of.get(id)?)?;
        (id_of(item) == id).then_some(item)
    }
}

impl ById {
    /// The first item of `items` whose id (`id_of`) is `id`.
    pub fn find<'a, T>(
        &self,
        items: &'a [T],
        id: &str,
        id_of: impl Fn(&T) -> &str,
    ) -> Option<&'a T> {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        if positions.taken_at != items.len() {
            positions.take(items, &id_of);
        }
        if let Some(item) = positions.found(items, id, &id_of) {
            return Some(item);
        }
        // A position that no longer holds its id: the list changed in place.
        if positions.of.contains_key(id) {
            positions.take(items, &id_of);
            return positions.found(items, id, &id_of);
        }
        None
    }
}

/// A copy starts without positions: they are taken again at its first lookup.
impl Clone for ById {
    fn clone(&self) -> Self {
        ById::default()
    }
}

/// Positions say nothing about the list: every two are alike.
impl PartialEq for ById {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ById {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ById")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_item_with_an_id_as_the_list_changes() {
        let index = ById::default();
        fn id<'a>(item: &'a (&'static str, u32)) -> &'a str {
            item.0
        }
        let mut items = vec![("a", 1), ("b", 2), ("a", 3)];
        assert_eq!(index.find(&items, "a", id), Some(&("a", 1)));
        items.retain(|(_, n)| *n != 1);
        assert_eq!(index.find(&items, "a", id), Some(&("a", 3)));
        // Changed in place, the same length: the stale position is seen for what it is.
        items[0] = ("c", 4);
        assert_eq!(index.find(&items, "b", id), None);
        assert_eq!(index.find(&items, "c", id), Some(&("c", 4)));
        items.push(("d", 5));
        assert_eq!(index.find(&items, "d", id), Some(&("d", 5)));
        assert_eq!(index.find(&items, "a", id), Some(&("a", 3)));
    }
}

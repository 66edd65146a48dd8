//! The header edits planned for one message: names whose fields are
//! dropped from it, and fields added to it, as the encoder (`encode`)
//! applies them. The rules fill a plan (`rules::PlanEdits`); this module
//! knows nothing of rules or templates.

/// Fields to drop from a message and fields to add to it.
#[derive(Debug, Default)]
pub struct HeaderPlan {
    /// Lowercase names dropped from the original message.
    pub removed: Vec<Box<[u8]>>,
    /// `(name, value range in values)`
    pub added: Vec<(Box<[u8]>, std::ops::Range<usize>)>,
    pub values: Vec<u8>,
}

impl HeaderPlan {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    pub fn clear(&mut self) {
        self.removed.clear();
        self.added.clear();
        self.values.clear();
    }

    /// Drop the message's fields named `name`, and the fields of that
    /// name the plan added so far.
    pub fn remove(&mut self, name: &[u8]) {
        self.added.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if !self.drops(name) {
            self.removed.push(name.to_ascii_lowercase().into());
        }
    }

    /// Add a field `name`, its value whatever `write` appends.
    pub fn add_with(&mut self, name: &[u8], write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.values.len();
        write(&mut self.values);
        self.added.push((name.into(), start..self.values.len()));
    }

    /// Whether a field of the original message is dropped.
    pub fn drops(&self, name: &[u8]) -> bool {
        self.removed.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.added
            .iter()
            .map(|(n, r)| (&n[..], &self.values[r.clone()]))
    }
}

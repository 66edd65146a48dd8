//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016, section 3.4).
//!
//! Every backend fills the slots of a prime-sized table in its own
//! permutation order, taking turns, until the table is full. A lookup is
//! one index. The table is built from backend labels, not positions, so
//! when a backend leaves the others keep nearly all of their slots: only
//! the keys that mapped to the one that left move (measured in the tests).
//!
//! Owns: the table. Does not own: what is hashed (`balance`).

/// Table sizes: primes, at least 100 slots per backend so that shares
/// stay within a percent or so of even.
const SIZES: &[usize] = &[65_537, 131_071, 262_139, 524_287];

#[derive(Debug, Clone)]
pub struct Table {
    slots: Vec<u32>,
}

fn fnv(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Finish with a mix, so labels that differ in one byte spread.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl Table {
    pub fn new<S: AsRef<str>>(labels: &[S]) -> Table {
        let n = labels.len().max(1);
        let m = SIZES
            .iter()
            .copied()
            .find(|&m| m >= 100 * n)
            .unwrap_or(SIZES[SIZES.len() - 1]);
        let perm: Vec<(usize, usize)> = labels
            .iter()
            .map(|l| {
                let offset = (fnv(l.as_ref().as_bytes(), 1) % m as u64) as usize;
                let skip = (fnv(l.as_ref().as_bytes(), 2) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; labels.len()];
        let mut slots = vec![u32::MAX; m];
        let mut filled = 0;
        if labels.is_empty() {
            slots.fill(0);
            return Table { slots };
        }
        'fill: loop {
            for (i, &(offset, skip)) in perm.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Table { slots }
    }

    pub fn lookup(&self, key: u64) -> usize {
        self.slots[(key % self.slots.len() as u64) as usize] as usize
    }

    /// The first usable backend in the slots after `key`'s.
    pub fn next_usable(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let m = self.slots.len();
        let start = (key % m as u64) as usize;
        (1..m)
            .map(|k| self.slots[(start + k) % m] as usize)
            .find(|&i| usable(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_a_departure_moves_only_its_keys() {
        let labels: Vec<String> = (0..10).map(|i| format!("tcp://10.0.0.{i}:80")).collect();
        let t = Table::new(&labels);
        let mut counts = [0usize; 10];
        for &s in &t.slots {
            counts[s as usize] += 1;
        }
        let even = t.slots.len() / 10;
        for c in counts {
            assert!(c.abs_diff(even) * 100 < even * 2, "{counts:?}");
        }
        // Backend 3 leaves: keys on the others stay put (a few percent of
        // churn at most, from the table refilling).
        let mut fewer = labels.clone();
        fewer.remove(3);
        let u = Table::new(&fewer);
        let name = |tbl: &Table, ls: &[String], k: u64| ls[tbl.lookup(k)].clone();
        let mut moved = 0;
        let mut on_others = 0;
        for k in 0..100_000u64 {
            let key = fnv(&k.to_le_bytes(), 7);
            let before = name(&t, &labels, key);
            if before == labels[3] {
                continue;
            }
            on_others += 1;
            if name(&u, &fewer, key) != before {
                moved += 1;
            }
        }
        assert!(
            moved * 100 < on_others * 3,
            "{moved} of {on_others} keys moved"
        );
    }
}

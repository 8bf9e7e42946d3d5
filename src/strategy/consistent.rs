//! `consistent_hash`: the request's key (`hash_on`) picks its server from a Maglev table
//! ([`super::maglev`]) built from the URLs and weights of the servers in rotation, so that
//! every worker and every instance with the same servers sends a key to the same server,
//! and a server that joins or leaves moves about 1/N of the keys and no others. The table
//! is built when the slots or their rotation change, on the balancer, never per request; a
//! pick is one hash lookup. A request without the key is balanced round robin.

use super::{maglev::Maglev, RoundRobin, Slot, Strategy};

/// How many entries past the key's a pick walks when the key's server may not be used (this
/// request already tried it, or the pool is in panic): entries next to each other belong to
/// different servers, so one or two steps usually find another; past this, round robin.
const PROBES: u64 = 16;

/// Maglev consistent hashing over the servers in rotation; round robin without a key.
#[derive(Debug, Default)]
pub struct ConsistentHash {
    table: Maglev,
    /// For each server the table was built from, its slot.
    members: Vec<usize>,
    /// The (URL, weight) list the table was built from, in slot order: the same list again
    /// needs no new table.
    built_from: Vec<(String, u32)>,
    fallback: RoundRobin,
}

impl ConsistentHash {
    /// Builds the table again if the servers in rotation (or their weights) changed.
    fn rebuild(&mut self, slots: &[Slot]) {
        let members: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].in_rotation())
            .collect();
        let from: Vec<(String, u32)> = members
            .iter()
            .map(|&i| {
                let u = &slots[i].upstream;
                (u.key.to_string(), u.weight)
            })
            .collect();
        if from != self.built_from || self.members.len() != members.len() {
            let servers: Vec<(&str, u32)> = from.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            self.table = Maglev::build(&servers);
            self.built_from = from;
        }
        self.members = members;
    }
}

impl Strategy for ConsistentHash {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        key: Option<u64>,
    ) -> Option<usize> {
        if let Some(key) = key {
            for step in 0..PROBES {
                let Some(entry) = self.table.lookup(key.wrapping_add(step)) else {
                    break;
                };
                let slot = self.members[entry];
                if usable(slot) {
                    return Some(slot);
                }
            }
        }
        self.fallback.pick(slots, usable, None)
    }

    fn resize(&mut self, slots: &[Slot]) {
        self.fallback.resize(slots);
        self.rebuild(slots);
    }

    fn rotation_changed(&mut self, slots: &[Slot]) {
        self.rebuild(slots);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{
        super::{maglev::hash_key, test_slots},
        *,
    };

    fn slots(ports: &[u16]) -> Vec<Slot> {
        test_slots(ports.iter().copied())
    }

    fn ready(s: &[Slot]) -> ConsistentHash {
        let mut c = ConsistentHash::default();
        c.resize(s);
        c
    }

    /// The port each of `keys` goes to.
    fn ports(c: &mut ConsistentHash, s: &[Slot], keys: u32) -> Vec<u16> {
        (0..keys)
            .map(|k| {
                let key = hash_key(format!("user-{k}").as_bytes());
                let i = c.pick(s, &|i| s[i].in_rotation(), Some(key)).unwrap();
                s[i].upstream.url.port().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_key_stays_on_its_server_and_two_instances_agree_whatever_the_list_order() {
        let s = slots(&[1, 2, 3, 4]);
        let mut one = ready(&s);
        let first = ports(&mut one, &s, 1000);
        assert_eq!(first, ports(&mut one, &s, 1000), "the same again");
        let reversed: Vec<Slot> = s.iter().rev().cloned().collect();
        assert_eq!(ports(&mut ready(&reversed), &reversed, 1000), first);
        for port in 1..=4 {
            let share = first.iter().filter(|&&p| p == port).count();
            assert!((200..300).contains(&share), "port {port}: {share} of 1000");
        }
    }

    #[test]
    fn a_server_out_of_rotation_has_its_keys_spread_and_gets_them_back_and_no_other_key_moves() {
        let mut s = slots(&[1, 2, 3, 4, 5]);
        let mut c = ready(&s);
        let before = ports(&mut c, &s, 5000);
        s[1].healthy = false;
        c.rotation_changed(&s);
        let during = ports(&mut c, &s, 5000);
        let mut moved_others = 0;
        for (b, d) in before.iter().zip(&during) {
            if *b == 2 {
                assert_ne!(*d, 2);
            } else if b != d {
                moved_others += 1;
            }
        }
        assert!(
            moved_others * 100 <= 5 * 4000,
            "{moved_others} keys of other servers moved"
        );
        s[1].healthy = true;
        c.rotation_changed(&s);
        assert_eq!(ports(&mut c, &s, 5000), before, "its keys come back");
    }

    #[test]
    fn without_a_key_or_with_the_keys_server_tried_another_is_picked() {
        let s = slots(&[1, 2, 3]);
        let mut c = ready(&s);
        let rr: Vec<usize> = (0..3)
            .map(|_| c.pick(&s, &|_| true, None).unwrap())
            .collect();
        assert_eq!(rr, [0, 1, 2], "round robin");
        let key = hash_key(b"k");
        let home = c.pick(&s, &|_| true, Some(key)).unwrap();
        let other = c.pick(&s, &|i| i != home, Some(key)).unwrap();
        assert_ne!(other, home);
        assert_eq!(c.pick(&s, &|_| false, Some(key)), None);
    }

    #[test]
    fn weights_give_keys_in_proportion() {
        let mut s = slots(&[1, 2]);
        Arc::get_mut(&mut s[0].upstream).unwrap().weight = 3;
        let mut c = ready(&s);
        let picks = ports(&mut c, &s, 4000);
        let heavy = picks.iter().filter(|&&p| p == 1).count();
        assert!(
            (2800..3200).contains(&heavy),
            "weight 3 of 4: {heavy} of 4000"
        );
    }
}

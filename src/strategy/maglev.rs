//! Maglev consistent hashing: a lookup table from a request's key to a server, the same on
//! every worker and every instance built from the same servers.
//!
//! Follows "Maglev: A Fast and Reliable Software Network Load Balancer" (Eisenbud et al.,
//! NSDI 2016), section 3.4 and its pseudocode listing 1: each server walks its own
//! permutation of the table's entries (an offset and a skip from two hashes of its name),
//! and the servers take turns claiming the next free entry of their permutation until the
//! table is full. Weights are added as Envoy's `maglev_lb.cc` does: a server claims an
//! entry in a round only while its entries per unit of weight are not ahead of the
//! heaviest server's, which claims one every round.
//!
//! Nothing here may depend on the process or the order servers were listed in, or two
//! workers (or two instances, or two versions during a rolling upgrade) would send a key to
//! different servers: the hashes are XXH3-64 with fixed seeds (the algorithm is frozen
//! upstream since xxHash 0.8), the servers take their turns in the order of their names, and
//! weights are compared in integers. Changing a seed or the fill order remaps every key.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Entries in a table: a prime, so that every skip below it walks all entries (the paper's
/// condition), and large enough that each of up to a few hundred servers gets hundreds of
/// entries (the paper's M ≫ 100 N for shares within about 1%).
pub(crate) const TABLE_SIZE: usize = 65_537;

/// Seeds of the two hashes of a server's name (offset and skip); part of the table's
/// definition, see the module's comment.
const OFFSET_SEED: u64 = 1;
const SKIP_SEED: u64 = 2;

/// An entry not yet claimed while a table is being filled.
const FREE: u32 = u32::MAX;

/// The stable hash of a request's key (client IP bytes, a header value, a cookie, a query
/// parameter or the path) to give to [`Maglev::lookup`]: XXH3-64 with seed 0, the same in
/// every process.
pub(crate) fn hash_key(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// A filled Maglev lookup table; each entry is the index of a server in the slice it was
/// built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Maglev {
    /// [`TABLE_SIZE`] entries, or none when built from no server with a weight.
    table: Vec<u32>,
}

/// One server's walk through its permutation while the table fills.
struct Walk {
    /// The server's index in the slice given to [`Maglev::build`].
    server: u32,
    weight: u64,
    /// Its permutation's next entry: offset + j × skip (mod the table size), kept as a
    /// running sum.
    next: u64,
    skip: u64,
    claimed: u64,
}

impl Walk {
    fn advance(&mut self) {
        self.next += self.skip;
        if self.next >= TABLE_SIZE as u64 {
            self.next -= TABLE_SIZE as u64;
        }
    }
}

impl Maglev {
    /// Fills a table from `servers`, each a stable name (the server's URL, the same string
    /// in every process) and a weight. The table depends only on the set of names and
    /// weights, not on their order in the slice; its entries are indices into `servers` as
    /// given. Names must be distinct. A server of weight 0 gets no entry; with no server of
    /// positive weight the table is empty.
    ///
    /// Takes about a millisecond in a release build (0.4 ms for 3 servers, 0.9 for 10, 1.1
    /// to 2.9 for 100 depending on weights), so it belongs where membership or health
    /// changes, never on a request.
    pub(crate) fn build(servers: &[(&str, u32)]) -> Maglev {
        let mut order: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].1 > 0).collect();
        // The turns go by name so that the slice's order cannot change the table.
        order.sort_unstable_by_key(|&i| servers[i].0);
        debug_assert!(
            order.windows(2).all(|w| servers[w[0]].0 != servers[w[1]].0),
            "Maglev server names must be distinct"
        );
        let Some(heaviest) = order.iter().map(|&i| u64::from(servers[i].1)).max() else {
            return Maglev { table: Vec::new() };
        };
        let size = TABLE_SIZE as u64;
        let mut walks: Vec<Walk> = order
            .iter()
            .map(|&i| {
                let (name, weight) = servers[i];
                Walk {
                    // A pool has far fewer than 2^32 - 1 servers (that value marks a free entry).
                    server: i as u32,
                    weight: u64::from(weight),
                    next: xxh3_64_with_seed(name.as_bytes(), OFFSET_SEED) % size,
                    // In 1..size: never 0, and coprime with the prime size, so the walk
                    // reaches every entry.
                    skip: xxh3_64_with_seed(name.as_bytes(), SKIP_SEED) % (size - 1) + 1,
                    claimed: 0,
                }
            })
            .collect();

        let mut table = vec![FREE; TABLE_SIZE];
        let mut free = TABLE_SIZE;
        // The heaviest server claims an entry every round, so the table is full after at
        // most TABLE_SIZE rounds: round × weight stays far below u64::MAX.
        let mut round: u64 = 0;
        while free > 0 {
            round += 1;
            for walk in &mut walks {
                // Envoy's weighting, in integers: claim only while claimed / weight is not
                // ahead of round / heaviest.
                if round * walk.weight < walk.claimed * heaviest {
                    continue;
                }
                while table[walk.next as usize] != FREE {
                    walk.advance();
                }
                table[walk.next as usize] = walk.server;
                walk.advance();
                walk.claimed += 1;
                free -= 1;
                if free == 0 {
                    break;
                }
            }
        }
        Maglev { table }
    }

    /// The index (into the slice the table was built from) of the server for a key hashed
    /// by [`hash_key`], or `None` when the table is empty.
    pub(crate) fn lookup(&self, key_hash: u64) -> Option<usize> {
        self.table
            .get((key_hash % TABLE_SIZE as u64) as usize)
            .map(|&server| server as usize)
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};

    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("http://10.0.0.{i}:8080/"))
            .collect()
    }

    fn weighted<'a>(names: &'a [String], weights: &[u32]) -> Vec<(&'a str, u32)> {
        names
            .iter()
            .map(String::as_str)
            .zip(weights.iter().copied())
            .collect()
    }

    fn equal(names: &[String]) -> Vec<(&str, u32)> {
        weighted(names, &vec![1; names.len()])
    }

    /// The name of the server at every entry, to compare tables built from different slices.
    fn entries<'a>(maglev: &Maglev, servers: &[(&'a str, u32)]) -> Vec<&'a str> {
        maglev
            .table
            .iter()
            .map(|&i| servers[i as usize].0)
            .collect()
    }

    /// The name of the server each key goes to.
    fn route<'a>(maglev: &Maglev, servers: &[(&'a str, u32)], keys: &[u64]) -> Vec<&'a str> {
        keys.iter()
            .map(|&k| servers[maglev.lookup(k).unwrap()].0)
            .collect()
    }

    fn random_keys(n: usize) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(23);
        (0..n)
            .map(|_| hash_key(&rng.random::<[u8; 16]>()))
            .collect()
    }

    /// Share of each server (by index) among `picks`.
    fn shares(picks: impl Iterator<Item = usize>, servers: usize) -> Vec<f64> {
        let mut counts = vec![0usize; servers];
        let mut total = 0;
        for i in picks {
            counts[i] += 1;
            total += 1;
        }
        counts.iter().map(|&c| c as f64 / total as f64).collect()
    }

    /// Among the keys on neither side of a change to `server` (not on it before, not on it
    /// after), the share whose server changed: what Maglev moves beyond the minimum.
    fn moved_among_others(before: &[&str], after: &[&str], server: &str) -> f64 {
        let others: Vec<bool> = before
            .iter()
            .zip(after)
            .filter(|(b, a)| **b != server && **a != server)
            .map(|(b, a)| b != a)
            .collect();
        others.iter().filter(|&&moved| moved).count() as f64 / others.len() as f64
    }

    fn share_of(names: &[&str], server: &str) -> f64 {
        names.iter().filter(|&&n| n == server).count() as f64 / names.len() as f64
    }

    #[test]
    fn hash_key_is_xxh3_64_with_seed_0() {
        // The reference test vector of XXH3_64bits for the empty input: every process, on
        // every platform, hashes a key to the same value.
        assert_eq!(hash_key(b""), 0x2d06_8005_38d3_94c2);
    }

    #[test]
    fn the_table_is_the_same_in_every_version() {
        // Instances of two versions run side by side during a rolling upgrade: if this
        // changes (a seed, the fill order, the weighting), every key moves between them.
        let servers = [
            ("http://127.0.0.1:5001/", 1),
            ("http://127.0.0.1:5002/", 1),
            ("http://127.0.0.1:5003/", 2),
        ];
        let maglev = Maglev::build(&servers);
        assert_eq!(
            maglev.table[..16],
            [2, 2, 0, 2, 1, 2, 1, 0, 2, 1, 2, 2, 2, 1, 2, 2]
        );
        assert_eq!(hash_key(b"/cart"), 0xba55_37b0_c3b0_5b03);
        assert_eq!(maglev.lookup(hash_key(b"/cart")), Some(1));
    }

    #[test]
    fn equal_weights_give_every_server_the_same_number_of_entries_give_or_take_one() {
        let keys = random_keys(100_000);
        for n in [1, 3, 5, 10, 100] {
            let names = urls(n);
            let servers = equal(&names);
            let maglev = Maglev::build(&servers);
            assert_eq!(maglev.table.len(), TABLE_SIZE);
            let mut counts = vec![0usize; n];
            maglev.table.iter().for_each(|&i| counts[i as usize] += 1);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "{n} servers: {min}..={max} entries each");

            let by_key = shares(keys.iter().map(|&k| maglev.lookup(k).unwrap()), n);
            for share in by_key {
                let off = (share * n as f64 - 1.0).abs();
                // 100k keys: about 1,000 per server at n = 100, so a few percent of noise.
                assert!(off < 0.12, "{n} servers: one got {share:.4} of the keys");
            }
        }
    }

    #[test]
    fn weights_give_proportional_shares_of_the_table() {
        for weights in [&[1, 2][..], &[1, 2, 3], &[1, 2, 3, 4, 5], &[10, 1, 1]] {
            let names = urls(weights.len());
            let servers = weighted(&names, weights);
            let maglev = Maglev::build(&servers);
            let total: u32 = weights.iter().sum();
            let by_entry = shares(maglev.table.iter().map(|&i| i as usize), weights.len());
            for (share, &w) in by_entry.iter().zip(weights) {
                let want = f64::from(w) / f64::from(total);
                assert!(
                    (share / want - 1.0).abs() < 0.01,
                    "weights {weights:?}: weight {w} got {share:.4}, not {want:.4}"
                );
            }
        }
    }

    #[test]
    fn the_order_of_the_servers_does_not_change_where_a_key_goes() {
        let names = urls(10);
        let servers = weighted(&names, &[1, 2, 3, 1, 2, 3, 1, 2, 3, 1]);
        let mut shuffled = servers.clone();
        shuffled.shuffle(&mut SmallRng::seed_from_u64(5));
        assert_ne!(shuffled, servers);
        let (a, b) = (Maglev::build(&servers), Maglev::build(&shuffled));
        let keys = random_keys(10_000);
        assert_eq!(route(&a, &servers, &keys), route(&b, &shuffled, &keys));
        assert_eq!(entries(&a, &servers), entries(&b, &shuffled));
        // Built twice from the same slice: the same table, index for index.
        assert_eq!(Maglev::build(&servers), a);
    }

    #[test]
    fn removing_one_server_moves_its_keys_and_at_most_5_percent_of_the_others() {
        let keys = random_keys(100_000);
        for n in [5, 10] {
            let names = urls(n);
            let all = equal(&names);
            let before = Maglev::build(&all);
            for (gone, _) in &all {
                let rest: Vec<_> = all.iter().copied().filter(|s| s.0 != *gone).collect();
                let after = Maglev::build(&rest);
                let (old, new) = (entries(&before, &all), entries(&after, &rest));
                assert!(!new.contains(gone));
                let moved = moved_among_others(&old, &new, gone);
                assert!(
                    moved <= 0.05,
                    "{n} servers, {gone} removed: {moved:.4} of entries"
                );
                let (old, new) = (route(&before, &all, &keys), route(&after, &rest, &keys));
                let moved = moved_among_others(&old, &new, gone);
                assert!(
                    moved <= 0.05,
                    "{n} servers, {gone} removed: {moved:.4} of keys"
                );
            }
        }
    }

    #[test]
    fn adding_a_server_gives_it_its_share_and_moves_at_most_5_percent_of_the_others() {
        let keys = random_keys(100_000);
        let newcomer = "http://10.0.0.99:8080/";
        for n in [5, 10] {
            let names = urls(n);
            let old_servers = equal(&names);
            let mut new_servers = old_servers.clone();
            new_servers.push((newcomer, 1));
            let (before, after) = (Maglev::build(&old_servers), Maglev::build(&new_servers));
            let fair = 1.0 / (n + 1) as f64;

            let (old, new) = (
                entries(&before, &old_servers),
                entries(&after, &new_servers),
            );
            let share = share_of(&new, newcomer);
            assert!(
                (share / fair - 1.0).abs() < 0.001,
                "{n} + 1 servers: {share:.4}"
            );
            let moved = moved_among_others(&old, &new, newcomer);
            assert!(
                moved <= 0.05,
                "{n} + 1 servers: {moved:.4} of the other entries"
            );

            let old = route(&before, &old_servers, &keys);
            let new = route(&after, &new_servers, &keys);
            let share = share_of(&new, newcomer);
            assert!(
                (share / fair - 1.0).abs() < 0.05,
                "{n} + 1 servers: {share:.4}"
            );
            let moved = moved_among_others(&old, &new, newcomer);
            assert!(
                moved <= 0.05,
                "{n} + 1 servers: {moved:.4} of the other keys"
            );
        }
    }

    #[test]
    fn a_server_that_leaves_has_its_keys_spread_over_the_rest_and_gets_them_back() {
        let names = urls(5);
        let all = equal(&names);
        let gone = all[2].0;
        let rest: Vec<_> = all.iter().copied().filter(|s| s.0 != gone).collect();
        let (before, during) = (Maglev::build(&all), Maglev::build(&rest));
        let (old, new) = (entries(&before, &all), entries(&during, &rest));
        // Where the gone server's entries went: each of the four others took a fair part.
        let inherited: Vec<&str> = old
            .iter()
            .zip(&new)
            .filter(|(o, _)| **o == gone)
            .map(|(_, n)| *n)
            .collect();
        for (name, _) in &rest {
            let part = share_of(&inherited, name);
            assert!((part * 4.0 - 1.0).abs() < 0.25, "{name} took {part:.3}");
        }
        // It comes back at the end of the list, as an added server would: the same table.
        let mut back = rest.clone();
        back.push(all[2]);
        assert_eq!(entries(&Maglev::build(&back), &back), old);
    }

    #[test]
    fn a_table_without_servers_of_positive_weight_finds_none() {
        assert_eq!(Maglev::build(&[]).lookup(7), None);
        assert_eq!(Maglev::build(&[("http://a/", 0)]).lookup(7), None);
        let one = Maglev::build(&[("http://a/", 0), ("http://b/", 3)]);
        assert!(one.table.iter().all(|&i| i == 1));
        assert_eq!(one.lookup(u64::MAX), Some(1));
    }
}

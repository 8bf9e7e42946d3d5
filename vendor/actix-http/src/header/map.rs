//! A multi-value [`HeaderMap`] and its iterators.

use std::{
    borrow::Cow,
    cell::RefCell,
    collections::hash_map,
    fmt,
    hash::{Hash as _, Hasher},
    iter, mem, ops,
};

use foldhash::{fast::FoldHasher, SharedSeed};
use http::header::{HeaderName, HeaderValue};
use smallvec::{smallvec, SmallVec};

use super::AsHeaderName;

/// A multi-map of HTTP headers.
///
/// `HeaderMap` is a "multi-map" of [`HeaderName`] to one or more [`HeaderValue`]s.
///
/// # Examples
///
/// ```
/// # use actix_http::header::{self, HeaderMap, HeaderValue};
///
/// let mut map = HeaderMap::new();
///
/// map.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
/// map.insert(header::ORIGIN, HeaderValue::from_static("example.com"));
///
/// assert!(map.contains_key(header::CONTENT_TYPE));
/// assert!(map.contains_key(header::ORIGIN));
///
/// let mut removed = map.remove(header::ORIGIN);
/// assert_eq!(removed.next().unwrap(), "example.com");
///
/// assert!(!map.contains_key(header::ORIGIN));
/// ```
///
/// Construct a header map using the [`FromIterator`] implementation. Note that it uses the append
/// strategy, so duplicate header names are preserved.
///
/// ```
/// use actix_http::header::{self, HeaderMap, HeaderValue};
///
/// let headers = HeaderMap::from_iter([
///     (header::CONTENT_TYPE, HeaderValue::from_static("text/plain")),
///     (header::COOKIE, HeaderValue::from_static("foo=1")),
///     (header::COOKIE, HeaderValue::from_static("bar=1")),
/// ]);
///
/// assert_eq!(headers.len(), 3);
/// ```
#[derive(Clone, Default)]
pub struct HeaderMap {
    pub(crate) inner: Table,
    /// One bit per name in the map, by [`name_bit`] (and bits of names since removed, until
    /// the map is emptied): a lookup of a name whose bit is clear is answered without hashing
    /// it (roundabout patch, VENDORED.md). Most lookups a proxy makes are for names a message
    /// does not have (`Connection`, `Upgrade`, `Transfer-Encoding`, `X-Request-Id`, ...).
    present: u64,
}

impl fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderMap")
            .field("inner", &self.inner)
            .finish()
    }
}

/// A map's table: names hashed by foldhash, as upstream's, but seeded per process rather
/// than per map (roundabout patch, VENDORED.md): a per-map seed is 8 bytes in every map,
/// moved with every head that holds one.
type Table = std::collections::HashMap<HeaderName, Value, ProcessSeed>;

/// foldhash's process-wide random seed, with a fixed per-hasher one: an attacker still
/// cannot know where names fall.
#[derive(Clone, Copy, Default)]
pub(crate) struct ProcessSeed;

impl std::hash::BuildHasher for ProcessSeed {
    type Hasher = FoldHasher<'static>;

    #[inline(always)]
    fn build_hasher(&self) -> FoldHasher<'static> {
        FoldHasher::with_seed(0x243f_6a88_85a3_08d3, SharedSeed::global_random())
    }
}

/// A name's bit in [`HeaderMap::present`]: a standard name's from its index among them, any
/// other's from its length and last two bytes. (Read through `HeaderName`'s `Hash`, the one
/// way to a standard name's index: `as_str` is a call and a jump table.)
#[inline]
fn name_bit(name: &HeaderName) -> u64 {
    let mut bits = NameBits(0);
    name.hash(&mut bits);
    1 << (bits.0.wrapping_mul(0x94d0_49bb_1331_11eb) >> 58)
}

/// [`name_bit`]'s `Hasher`: `HeaderName` writes a standard name as two integers (its kind
/// and index), another as its kind and its bytes.
struct NameBits(u64);

impl Hasher for NameBits {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let len = bytes.len();
        let at = |i: usize| len.checked_sub(i).map_or(0, |i| u64::from(bytes[i]));
        self.0 = self.0.rotate_left(24) ^ (len as u64 | at(1) << 8 | at(2) << 16);
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = self.0.rotate_left(24) ^ i;
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    #[inline]
    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as u64);
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The values of one name, inline: one value (nearly every name has one; a repeated
/// `Set-Cookie` spills to the heap). Upstream kept four inline, which made every bucket of
/// the map ~200 bytes, moved whole on each insert and rehash (VENDORED.md, "Cost").
type Values = SmallVec<[HeaderValue; 1]>;

/// Spare tables kept per thread, and the largest kept (the capacity of a 32-bucket table).
const MAX_SPARE_TABLES: usize = 32;
const MAX_SPARE_CAPACITY: usize = 28;

thread_local! {
    /// Empty tables left over by [`HeaderMap::move_from`], for the next decoded head to take
    /// ([`HeaderMap::reserve_pooled`]; roundabout patch, VENDORED.md): a proxy's answer takes
    /// the server's table and leaves its own, which was freed while the next answer from a
    /// server allocated one.
    static SPARE_TABLES: RefCell<Vec<Table>> =
        const { RefCell::new(Vec::new()) };
}

/// A bespoke non-empty list for HeaderMap values.
#[derive(Debug, Clone)]
pub(crate) struct Value {
    inner: Values,
}

impl Value {
    fn one(val: HeaderValue) -> Self {
        Self {
            inner: smallvec![val],
        }
    }

    fn first(&self) -> &HeaderValue {
        &self.inner[0]
    }

    fn first_mut(&mut self) -> &mut HeaderValue {
        &mut self.inner[0]
    }

    fn append(&mut self, new_val: HeaderValue) {
        self.inner.push(new_val)
    }
}

impl ops::Deref for Value {
    type Target = Values;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl HeaderMap {
    /// Create an empty `HeaderMap`.
    ///
    /// The map will be created without any capacity; this function will not allocate.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::HeaderMap;
    /// let map = HeaderMap::new();
    ///
    /// assert!(map.is_empty());
    /// assert_eq!(0, map.capacity());
    /// ```
    pub fn new() -> Self {
        HeaderMap::default()
    }

    /// Create an empty `HeaderMap` with the specified capacity.
    ///
    /// The map will be able to hold at least `capacity` elements without needing to reallocate.
    /// If `capacity` is 0, the map will be created without allocating.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::HeaderMap;
    /// let map = HeaderMap::with_capacity(16);
    ///
    /// assert!(map.is_empty());
    /// assert!(map.capacity() >= 16);
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        HeaderMap {
            inner: Table::with_capacity_and_hasher(capacity, ProcessSeed),
            present: 0,
        }
    }

    /// Reserves room for `additional` more headers; a map without a table takes an empty one
    /// this thread has spare (see [`move_from`](Self::move_from)) before it allocates.
    pub(crate) fn reserve_pooled(&mut self, additional: usize) {
        if self.inner.capacity() == 0 {
            if let Ok(Some(table)) = SPARE_TABLES.try_with(|spares| spares.borrow_mut().pop()) {
                self.inner = table;
            }
        }
        self.inner.reserve(additional);
    }

    /// Create new `HeaderMap` from a `http::HeaderMap`-like drain.
    pub(crate) fn from_drain<I>(mut drain: I) -> Self
    where
        I: Iterator<Item = (Option<HeaderName>, HeaderValue)>,
    {
        let (first_name, first_value) = match drain.next() {
            None => return HeaderMap::new(),
            Some((name, val)) => {
                let name = name.expect("drained first item had no name");
                (name, val)
            }
        };

        let (lb, ub) = drain.size_hint();
        let capacity = ub.unwrap_or(lb);

        let mut map = HeaderMap::with_capacity(capacity);
        map.append(first_name.clone(), first_value);

        let (map, _) = drain.fold((map, first_name), |(mut map, prev_name), (name, value)| {
            let name = name.unwrap_or(prev_name);
            map.append(name.clone(), value);
            (map, name)
        });

        map
    }

    /// Returns the number of values stored in the map.
    ///
    /// See also: [`len_keys`](Self::len_keys).
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    /// assert_eq!(map.len(), 0);
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// assert_eq!(map.len(), 2);
    ///
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    /// assert_eq!(map.len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        self.inner.values().map(|vals| vals.len()).sum()
    }

    /// Returns the number of _keys_ stored in the map.
    ///
    /// The number of values stored will be at least this number. See also: [`Self::len`].
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    /// assert_eq!(map.len_keys(), 0);
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// assert_eq!(map.len_keys(), 2);
    ///
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    /// assert_eq!(map.len_keys(), 2);
    /// ```
    pub fn len_keys(&self) -> usize {
        self.inner.len()
    }

    /// Returns true if the map contains no elements.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    /// assert!(map.is_empty());
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// assert!(!map.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.inner.len() == 0
    }

    /// Clears the map, removing all name-value pairs.
    ///
    /// Keeps the allocated memory for reuse.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// assert_eq!(map.len(), 2);
    ///
    /// map.clear();
    /// assert!(map.is_empty());
    /// ```
    pub fn clear(&mut self) {
        self.inner.clear();
        self.present = 0;
    }

    /// Whether the map may hold `name`: `false` means it does not.
    #[inline]
    fn may_hold(&self, name: &HeaderName) -> bool {
        self.present & name_bit(name) != 0
    }

    fn get_value(&self, key: impl AsHeaderName) -> Option<&Value> {
        match key.try_as_name(super::as_name::Seal).ok()? {
            Cow::Borrowed(name) if self.may_hold(name) => self.inner.get(name),
            Cow::Owned(name) if self.may_hold(&name) => self.inner.get(&name),
            _ => None,
        }
    }

    /// Returns a reference to the _first_ value associated with a header name.
    ///
    /// Returns `None` if there is no value associated with the key.
    ///
    /// Even when multiple values are associated with the key, the "first" one is returned but is
    /// not guaranteed to be chosen with any particular order; though, the returned item will be
    /// consistent for each call to `get` if the map has not changed.
    ///
    /// See also: [`get_all`](Self::get_all).
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    ///
    /// let cookie = map.get(header::SET_COOKIE).unwrap();
    /// assert_eq!(cookie, "one=1");
    ///
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    /// assert_eq!(map.get(header::SET_COOKIE).unwrap(), "one=1");
    ///
    /// assert_eq!(map.get(header::SET_COOKIE), map.get("set-cookie"));
    /// assert_eq!(map.get(header::SET_COOKIE), map.get("Set-Cookie"));
    ///
    /// assert!(map.get(header::HOST).is_none());
    /// assert!(map.get("INVALID HEADER NAME").is_none());
    /// ```
    pub fn get(&self, key: impl AsHeaderName) -> Option<&HeaderValue> {
        self.get_value(key).map(Value::first)
    }

    /// Returns a mutable reference to the _first_ value associated a header name.
    ///
    /// Returns `None` if there is no value associated with the key.
    ///
    /// Even when multiple values are associated with the key, the "first" one is returned but is
    /// not guaranteed to be chosen with any particular order; though, the returned item will be
    /// consistent for each call to `get_mut` if the map has not changed.
    ///
    /// See also: [`get_all`](Self::get_all).
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    ///
    /// let mut cookie = map.get_mut(header::SET_COOKIE).unwrap();
    /// assert_eq!(cookie, "one=1");
    ///
    /// *cookie = HeaderValue::from_static("three=3");
    /// assert_eq!(map.get(header::SET_COOKIE).unwrap(), "three=3");
    ///
    /// assert!(map.get(header::HOST).is_none());
    /// assert!(map.get("INVALID HEADER NAME").is_none());
    /// ```
    pub fn get_mut(&mut self, key: impl AsHeaderName) -> Option<&mut HeaderValue> {
        match key.try_as_name(super::as_name::Seal).ok()? {
            Cow::Borrowed(name) if self.may_hold(name) => {
                self.inner.get_mut(name).map(Value::first_mut)
            }
            Cow::Owned(name) if self.may_hold(&name) => {
                self.inner.get_mut(&name).map(Value::first_mut)
            }
            _ => None,
        }
    }

    /// Returns an iterator over all values associated with a header name.
    ///
    /// The returned iterator does not incur any allocations and will yield no items if there are no
    /// values associated with the key. Iteration order is guaranteed to be the same as
    /// insertion order.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let mut none_iter = map.get_all(header::ORIGIN);
    /// assert!(none_iter.next().is_none());
    ///
    /// map.insert(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    ///
    /// let mut set_cookies_iter = map.get_all(header::SET_COOKIE);
    /// assert_eq!(set_cookies_iter.next().unwrap(), "one=1");
    /// assert_eq!(set_cookies_iter.next().unwrap(), "two=2");
    /// assert!(set_cookies_iter.next().is_none());
    /// ```
    pub fn get_all(&self, key: impl AsHeaderName) -> std::slice::Iter<'_, HeaderValue> {
        match self.get_value(key) {
            Some(value) => value.iter(),
            None => [].iter(),
        }
    }

    // TODO: get_all_mut ?

    /// Returns `true` if the map contains a value for the specified key.
    ///
    /// Invalid header names will simply return false.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    /// assert!(!map.contains_key(header::ACCEPT));
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// assert!(map.contains_key(header::ACCEPT));
    /// ```
    pub fn contains_key(&self, key: impl AsHeaderName) -> bool {
        match key.try_as_name(super::as_name::Seal) {
            Ok(Cow::Borrowed(name)) => self.may_hold(name) && self.inner.contains_key(name),
            Ok(Cow::Owned(name)) => self.may_hold(&name) && self.inner.contains_key(&name),
            Err(_) => false,
        }
    }

    /// Inserts (overrides) a name-value pair in the map.
    ///
    /// If the map already contained this key, the new value is associated with the key and all
    /// previous values are removed and returned as a `Removed` iterator. The key is not updated;
    /// this matters for types that can be `==` without being identical.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// assert!(map.contains_key(header::ACCEPT));
    /// assert_eq!(map.len(), 1);
    ///
    /// let mut removed = map.insert(header::ACCEPT, HeaderValue::from_static("text/csv"));
    /// assert_eq!(removed.next().unwrap(), "text/plain");
    /// assert!(removed.next().is_none());
    ///
    /// assert_eq!(map.len(), 1);
    /// ```
    ///
    /// A convenience method is provided on the returned iterator to check if the insertion replaced
    /// any values.
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let removed = map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
    /// assert!(removed.is_empty());
    ///
    /// let removed = map.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
    /// assert!(!removed.is_empty());
    /// ```
    pub fn insert(&mut self, name: HeaderName, val: HeaderValue) -> Removed {
        self.present |= name_bit(&name);
        let value = self.inner.insert(name, Value::one(val));
        Removed::new(value)
    }

    /// Appends a name-value pair to the map.
    ///
    /// If the map already contained this key, the new value is added to the list of values
    /// currently associated with the key. The key is not updated; this matters for types that can
    /// be `==` without being identical.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.append(header::HOST, HeaderValue::from_static("example.com"));
    /// assert_eq!(map.len(), 1);
    ///
    /// map.append(header::ACCEPT, HeaderValue::from_static("text/csv"));
    /// assert_eq!(map.len(), 2);
    ///
    /// map.append(header::ACCEPT, HeaderValue::from_static("text/html"));
    /// assert_eq!(map.len(), 3);
    /// ```
    pub fn append(&mut self, key: HeaderName, value: HeaderValue) {
        self.present |= name_bit(&key);
        match self.inner.entry(key) {
            hash_map::Entry::Occupied(mut entry) => {
                entry.get_mut().append(value);
            }
            hash_map::Entry::Vacant(entry) => {
                entry.insert(Value::one(value));
            }
        };
    }

    /// Removes all headers for a particular header name from the map.
    ///
    /// Providing an invalid header names (as a string argument) will have no effect and return
    /// without error.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=2"));
    ///
    /// assert_eq!(map.len(), 2);
    ///
    /// let mut removed = map.remove(header::SET_COOKIE);
    /// assert_eq!(removed.next().unwrap(), "one=1");
    /// assert_eq!(removed.next().unwrap(), "one=2");
    /// assert!(removed.next().is_none());
    ///
    /// assert!(map.is_empty());
    /// ```
    ///
    /// A convenience method is provided on the returned iterator to check if the `remove` call
    /// actually removed any values.
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let removed = map.remove("accept");
    /// assert!(removed.is_empty());
    ///
    /// map.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
    /// let removed = map.remove("accept");
    /// assert!(!removed.is_empty());
    /// ```
    pub fn remove(&mut self, key: impl AsHeaderName) -> Removed {
        let value = match key.try_as_name(super::as_name::Seal) {
            Ok(Cow::Borrowed(name)) if self.may_hold(name) => self.inner.remove(name),
            Ok(Cow::Owned(name)) if self.may_hold(&name) => self.inner.remove(&name),
            _ => None,
        };

        Removed::new(value)
    }

    /// Returns the number of single-value headers the map can hold without needing to reallocate.
    ///
    /// Since this is a multi-value map, the actual capacity is much larger when considering
    /// each header name can be associated with an arbitrary number of values. The effect is that
    /// the size of `len` may be greater than `capacity` since it counts all the values.
    /// Conversely, [`len_keys`](Self::len_keys) will never be larger than capacity.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::HeaderMap;
    /// let map = HeaderMap::with_capacity(16);
    ///
    /// assert!(map.is_empty());
    /// assert!(map.capacity() >= 16);
    /// ```
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Reserves capacity for at least `additional` more headers to be inserted in the map.
    ///
    /// The header map may reserve more space to avoid frequent reallocations. Additional capacity
    /// only considers single-value headers.
    ///
    /// # Panics
    /// Panics if the new allocation size overflows usize.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::HeaderMap;
    /// let mut map = HeaderMap::with_capacity(2);
    /// assert!(map.capacity() >= 2);
    ///
    /// map.reserve(100);
    /// assert!(map.capacity() >= 102);
    ///
    /// assert!(map.is_empty());
    /// ```
    pub fn reserve(&mut self, additional: usize) {
        self.inner.reserve(additional)
    }

    /// An iterator over all name-value pairs.
    ///
    /// Names will be yielded for each associated value. So, if a key has 3 associated values, it
    /// will be yielded 3 times. The iteration order should be considered arbitrary.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let mut iter = map.iter();
    /// assert!(iter.next().is_none());
    ///
    /// map.append(header::HOST, HeaderValue::from_static("duck.com"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    ///
    /// let mut iter = map.iter();
    /// assert!(iter.next().is_some());
    /// assert!(iter.next().is_some());
    /// assert!(iter.next().is_some());
    /// assert!(iter.next().is_none());
    ///
    /// let pairs = map.iter().collect::<Vec<_>>();
    /// assert!(pairs.contains(&(&header::HOST, &HeaderValue::from_static("duck.com"))));
    /// assert!(pairs.contains(&(&header::SET_COOKIE, &HeaderValue::from_static("one=1"))));
    /// assert!(pairs.contains(&(&header::SET_COOKIE, &HeaderValue::from_static("two=2"))));
    /// ```
    pub fn iter(&self) -> Iter<'_> {
        Iter::new(self.inner.iter(), self.len())
    }

    /// An iterator over all contained header names.
    ///
    /// Each name will only be yielded once even if it has multiple associated values. The iteration
    /// order should be considered arbitrary.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let mut iter = map.keys();
    /// assert!(iter.next().is_none());
    ///
    /// map.append(header::HOST, HeaderValue::from_static("duck.com"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    ///
    /// let keys = map.keys().cloned().collect::<Vec<_>>();
    /// assert_eq!(keys.len(), 2);
    /// assert!(keys.contains(&header::HOST));
    /// assert!(keys.contains(&header::SET_COOKIE));
    /// ```
    pub fn keys(&self) -> Keys<'_> {
        Keys(self.inner.keys())
    }

    /// Retains only the headers specified by the predicate.
    ///
    /// In other words, removes all headers `(name, val)` for which `retain_fn(&name, &mut val)`
    /// returns false.
    ///
    /// The order in which headers are visited should be considered arbitrary.
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// map.append(header::HOST, HeaderValue::from_static("duck.com"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    ///
    /// map.retain(|name, val| val.as_bytes().starts_with(b"one"));
    ///
    /// assert_eq!(map.len(), 1);
    /// assert!(map.contains_key(&header::SET_COOKIE));
    /// ```
    pub fn retain<F>(&mut self, mut retain_fn: F)
    where
        F: FnMut(&HeaderName, &mut HeaderValue) -> bool,
    {
        self.inner.retain(|name, vals| {
            vals.inner.retain(|val| retain_fn(name, val));

            // invariant: make sure newly empty value lists are removed
            !vals.is_empty()
        })
    }

    /// Clears the map, returning all name-value sets as an iterator.
    ///
    /// Header names will only be yielded for the first value in each set. All items that are
    /// yielded without a name and after an item with a name are associated with that same name.
    /// The first item will always contain a name.
    ///
    /// Keeps the allocated memory for reuse.
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut map = HeaderMap::new();
    ///
    /// let mut iter = map.drain();
    /// assert!(iter.next().is_none());
    /// drop(iter);
    ///
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("one=1"));
    /// map.append(header::SET_COOKIE, HeaderValue::from_static("two=2"));
    ///
    /// let mut iter = map.drain();
    /// assert_eq!(iter.next().unwrap(), (Some(header::SET_COOKIE), HeaderValue::from_static("one=1")));
    /// assert_eq!(iter.next().unwrap(), (None, HeaderValue::from_static("two=2")));
    /// drop(iter);
    ///
    /// assert!(map.is_empty());
    /// ```
    pub fn drain(&mut self) -> Drain<'_> {
        let len = self.len();
        // A drain empties the map, even one dropped part way.
        self.present = 0;
        Drain::new(self.inner.drain(), len)
    }

    /// Moves every header of `from` whose name `keep` accepts into this map, all its values
    /// at once, after any this map has of that name; `from` is left empty. (roundabout
    /// patch: a proxy passes a server's headers on in the answer's pooled map, which keeps
    /// its room between responses, instead of growing a map sized to the server's head;
    /// a name and its values are moved, never cloned.)
    ///
    /// # Examples
    /// ```
    /// # use actix_http::header::{self, HeaderMap, HeaderValue};
    /// let mut from = HeaderMap::new();
    /// from.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
    /// from.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
    /// from.insert(header::CONNECTION, HeaderValue::from_static("close"));
    /// let mut to = HeaderMap::new();
    /// to.insert(header::SET_COOKIE, HeaderValue::from_static("ours=0"));
    /// to.move_from(&mut from, |name| *name != header::CONNECTION);
    /// assert!(from.is_empty());
    /// let cookies: Vec<_> = to.get_all(header::SET_COOKIE).collect();
    /// assert_eq!(cookies, ["ours=0", "a=1", "b=2"]);
    /// assert!(!to.contains_key(header::CONNECTION));
    /// ```
    pub fn move_from(&mut self, from: &mut HeaderMap, mut keep: impl FnMut(&HeaderName) -> bool) {
        if self.inner.is_empty() {
            // Nothing to merge with: the maps trade tables, and what is not kept is dropped
            // in place; no name is hashed again and no bucket moves.
            mem::swap(&mut self.inner, &mut from.inner);
            self.present = mem::take(&mut from.present);
            self.inner.retain(|name, _| keep(name));
            // `from` now holds this map's table, empty: a spare for the next decoded head.
            give_spare(&mut from.inner);
            return;
        }
        self.present |= mem::take(&mut from.present);
        for (name, value) in from.inner.drain() {
            if !keep(&name) {
                continue;
            }
            match self.inner.entry(name) {
                hash_map::Entry::Occupied(mut entry) => entry.get_mut().inner.extend(value.inner),
                hash_map::Entry::Vacant(entry) => {
                    entry.insert(value);
                }
            }
        }
    }
}

/// Keeps `table`, empty, as one of this thread's spares if it is small and there is room,
/// leaving `table` without one; else leaves it as it is.
fn give_spare(table: &mut Table) {
    let capacity = table.capacity();
    if capacity == 0 || capacity > MAX_SPARE_CAPACITY || !table.is_empty() {
        return;
    }
    let _ = SPARE_TABLES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < MAX_SPARE_TABLES {
            spares.push(mem::take(table));
        }
    });
}

/// Note that this implementation will clone a [HeaderName] for each value. Consider using
/// [`drain`](Self::drain) to control header name cloning.
impl IntoIterator for HeaderMap {
    type Item = (HeaderName, HeaderValue);
    type IntoIter = IntoIter;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        let len = self.len();
        IntoIter::new(self.inner.into_iter(), len)
    }
}

impl<'a> IntoIterator for &'a HeaderMap {
    type Item = (&'a HeaderName, &'a HeaderValue);
    type IntoIter = Iter<'a>;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        Iter::new(self.inner.iter(), self.len())
    }
}

impl FromIterator<(HeaderName, HeaderValue)> for HeaderMap {
    fn from_iter<T: IntoIterator<Item = (HeaderName, HeaderValue)>>(iter: T) -> Self {
        iter.into_iter()
            .fold(Self::new(), |mut map, (name, value)| {
                map.append(name, value);
                map
            })
    }
}

/// Convert a `http::HeaderMap` to our `HeaderMap`.
impl From<http::HeaderMap> for HeaderMap {
    fn from(mut map: http::HeaderMap) -> Self {
        Self::from_drain(map.drain())
    }
}

/// Convert our `HeaderMap` to a `http::HeaderMap`.
impl From<HeaderMap> for http::HeaderMap {
    fn from(map: HeaderMap) -> Self {
        Self::from_iter(map)
    }
}

/// Convert our `&HeaderMap` to a `http::HeaderMap`.
impl From<&HeaderMap> for http::HeaderMap {
    fn from(map: &HeaderMap) -> Self {
        map.to_owned().into()
    }
}

/// Iterator over removed, owned values with the same associated name.
///
/// Returned from methods that remove or replace items. See [`HeaderMap::insert`]
/// and [`HeaderMap::remove`].
#[derive(Debug)]
pub struct Removed {
    inner: Option<<Values as IntoIterator>::IntoIter>,
}

impl Removed {
    fn new(value: Option<Value>) -> Self {
        let inner = value.map(|value| value.inner.into_iter());
        Self { inner }
    }

    /// Returns true if iterator contains no elements, without consuming it.
    ///
    /// If called immediately after [`HeaderMap::insert`] or [`HeaderMap::remove`], it will indicate
    /// whether any items were actually replaced or removed, respectively.
    pub fn is_empty(&self) -> bool {
        match self.inner {
            // size hint lower bound of smallvec is the correct length
            Some(ref iter) => iter.size_hint().0 == 0,
            None => true,
        }
    }
}

impl Iterator for Removed {
    type Item = HeaderValue;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.as_mut()?.next()
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.inner {
            Some(ref iter) => iter.size_hint(),
            None => (0, Some(0)),
        }
    }
}

impl ExactSizeIterator for Removed {}

impl iter::FusedIterator for Removed {}

/// Iterator over all names in the map.
#[derive(Debug)]
pub struct Keys<'a>(hash_map::Keys<'a, HeaderName, Value>);

impl<'a> Iterator for Keys<'a> {
    type Item = &'a HeaderName;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for Keys<'_> {}

impl iter::FusedIterator for Keys<'_> {}

/// Iterator over borrowed name-value pairs.
#[derive(Debug)]
pub struct Iter<'a> {
    inner: hash_map::Iter<'a, HeaderName, Value>,
    multi_inner: Option<(&'a HeaderName, &'a Values)>,
    multi_idx: usize,
    remaining: usize,
}

impl<'a> Iter<'a> {
    fn new(iter: hash_map::Iter<'a, HeaderName, Value>, remaining: usize) -> Self {
        Self {
            inner: iter,
            multi_idx: 0,
            multi_inner: None,
            remaining,
        }
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a HeaderName, &'a HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        // handle in-progress multi value lists first
        if let Some((name, ref mut vals)) = self.multi_inner {
            match vals.get(self.multi_idx) {
                Some(val) => {
                    self.multi_idx += 1;
                    self.remaining -= 1;
                    return Some((name, val));
                }
                None => {
                    // no more items in value list; reset state
                    self.multi_idx = 0;
                    self.multi_inner = None;
                }
            }
        }

        let (name, value) = self.inner.next()?;

        // set up new inner iter and recurse into it
        self.multi_inner = Some((name, &value.inner));
        self.next()
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl iter::FusedIterator for Iter<'_> {}

/// Iterator over drained name-value pairs.
///
/// Iterator items are `(Option<HeaderName>, HeaderValue)` to avoid cloning.
#[derive(Debug)]
pub struct Drain<'a> {
    inner: hash_map::Drain<'a, HeaderName, Value>,
    multi_inner: Option<(Option<HeaderName>, Values)>,
    multi_idx: usize,
    remaining: usize,
}

impl<'a> Drain<'a> {
    fn new(iter: hash_map::Drain<'a, HeaderName, Value>, remaining: usize) -> Self {
        Self {
            inner: iter,
            multi_inner: None,
            multi_idx: 0,
            remaining,
        }
    }
}

impl Iterator for Drain<'_> {
    type Item = (Option<HeaderName>, HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        // handle in-progress multi value iterators first
        if let Some((ref mut name, ref mut vals)) = self.multi_inner {
            if !vals.is_empty() {
                // OPTIMIZE: array removals
                self.remaining -= 1;
                return Some((name.take(), vals.remove(0)));
            } else {
                // no more items in value iterator; reset state
                self.multi_inner = None;
                self.multi_idx = 0;
            }
        }

        let (name, value) = self.inner.next()?;

        // set up new inner iter and recurse into it
        self.multi_inner = Some((Some(name), value.inner));
        self.next()
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Drain<'_> {}

impl iter::FusedIterator for Drain<'_> {}

/// Iterator over owned name-value pairs.
///
/// Implementation necessarily clones header names for each value.
#[derive(Debug)]
pub struct IntoIter {
    inner: hash_map::IntoIter<HeaderName, Value>,
    multi_inner: Option<(HeaderName, <Values as IntoIterator>::IntoIter)>,
    remaining: usize,
}

impl IntoIter {
    fn new(inner: hash_map::IntoIter<HeaderName, Value>, remaining: usize) -> Self {
        Self {
            inner,
            multi_inner: None,
            remaining,
        }
    }
}

impl Iterator for IntoIter {
    type Item = (HeaderName, HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        // handle in-progress multi value iterators first
        if let Some((ref name, ref mut vals)) = self.multi_inner {
            match vals.next() {
                Some(val) => {
                    self.remaining -= 1;
                    return Some((name.clone(), val));
                }
                None => {
                    // no more items in value iterator; reset state
                    self.multi_inner = None;
                }
            }
        }

        let (name, value) = self.inner.next()?;

        // set up new inner iter and recurse into it
        self.multi_inner = Some((name, value.inner.into_iter()));
        self.next()
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for IntoIter {}

impl iter::FusedIterator for IntoIter {}

#[cfg(test)]
mod tests {
    use std::iter::FusedIterator;

    use http::header;
    use static_assertions::assert_impl_all;

    use super::*;

    assert_impl_all!(HeaderMap: IntoIterator);
    assert_impl_all!(Keys<'_>: Iterator, ExactSizeIterator, FusedIterator);
    assert_impl_all!(std::slice::Iter<'_, HeaderValue>: Iterator, ExactSizeIterator, FusedIterator);
    assert_impl_all!(Removed: Iterator, ExactSizeIterator, FusedIterator);
    assert_impl_all!(Iter<'_>: Iterator, ExactSizeIterator, FusedIterator);
    assert_impl_all!(IntoIter: Iterator, ExactSizeIterator, FusedIterator);
    assert_impl_all!(Drain<'_>: Iterator, ExactSizeIterator, FusedIterator);

    #[test]
    fn create() {
        let map = HeaderMap::new();
        assert_eq!(map.len(), 0);
        assert_eq!(map.capacity(), 0);

        let map = HeaderMap::with_capacity(16);
        assert_eq!(map.len(), 0);
        assert!(map.capacity() >= 16);
    }

    #[test]
    fn insert() {
        let mut map = HeaderMap::new();

        map.insert(header::LOCATION, HeaderValue::from_static("/test"));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn removed_has_exact_length() {
        let mut map = HeaderMap::new();
        let mut removed = map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));

        assert_eq!(removed.len(), 0);
        assert_eq!(removed.size_hint(), (0, Some(0)));
        assert!(removed.next().is_none());
        assert_eq!(removed.len(), 0);
        assert_eq!(removed.size_hint(), (0, Some(0)));

        let mut removed = map.remove(header::ACCEPT);

        assert_eq!(removed.len(), 1);
        assert_eq!(removed.size_hint(), (1, Some(1)));
        assert_eq!(removed.next(), Some(HeaderValue::from_static("text/plain")));
        assert_eq!(removed.len(), 0);
        assert_eq!(removed.size_hint(), (0, Some(0)));
        assert!(removed.next().is_none());

        let mut removed = map.remove(header::ACCEPT);

        assert_eq!(removed.len(), 0);
        assert_eq!(removed.size_hint(), (0, Some(0)));
        assert!(removed.next().is_none());
        assert_eq!(removed.len(), 0);
        assert_eq!(removed.size_hint(), (0, Some(0)));
    }

    #[test]
    fn contains() {
        let mut map = HeaderMap::new();
        assert!(!map.contains_key(header::LOCATION));

        map.insert(header::LOCATION, HeaderValue::from_static("/test"));
        assert!(map.contains_key(header::LOCATION));
        assert!(map.contains_key("Location"));
        assert!(map.contains_key("Location".to_owned()));
        assert!(map.contains_key("location"));
    }

    #[test]
    fn entries_iter() {
        let mut map = HeaderMap::new();

        map.append(header::HOST, HeaderValue::from_static("duck.com"));
        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        let mut iter = map.iter();
        assert!(iter.next().is_some());
        assert!(iter.next().is_some());
        assert!(iter.next().is_some());
        assert!(iter.next().is_none());

        let pairs = map.iter().collect::<Vec<_>>();
        assert!(pairs.contains(&(&header::HOST, &HeaderValue::from_static("duck.com"))));
        assert!(pairs.contains(&(&header::COOKIE, &HeaderValue::from_static("one=1"))));
        assert!(pairs.contains(&(&header::COOKIE, &HeaderValue::from_static("two=2"))));
    }

    #[test]
    fn drain_iter() {
        let mut map = HeaderMap::new();

        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        let mut vals = vec![];
        let mut iter = map.drain();

        let (name, val) = iter.next().unwrap();
        assert_eq!(name, Some(header::COOKIE));
        vals.push(val);

        let (name, val) = iter.next().unwrap();
        assert!(name.is_none());
        vals.push(val);

        assert!(vals.contains(&HeaderValue::from_static("one=1")));
        assert!(vals.contains(&HeaderValue::from_static("two=2")));

        assert!(iter.next().is_none());
        drop(iter);

        assert!(map.is_empty());
    }

    #[test]
    fn retain() {
        let mut map = HeaderMap::new();

        map.append(header::LOCATION, HeaderValue::from_static("/test"));
        map.append(header::HOST, HeaderValue::from_static("duck.com"));
        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        assert_eq!(map.len(), 4);

        // by value
        map.retain(|_, val| !val.as_bytes().contains(&b'/'));
        assert_eq!(map.len(), 3);

        // by name
        map.retain(|name, _| name.as_str() != "cookie");
        assert_eq!(map.len(), 1);

        // keep but mutate value
        map.retain(|_, val| {
            *val = HeaderValue::from_static("replaced");
            true
        });
        assert_eq!(map.len(), 1);
        assert_eq!(map.get("host").unwrap(), "replaced");
    }

    #[test]
    fn retain_removes_empty_value_lists() {
        let mut map = HeaderMap::with_capacity(3);

        map.append(header::HOST, HeaderValue::from_static("duck.com"));
        map.append(header::HOST, HeaderValue::from_static("duck.com"));

        assert_eq!(map.len(), 2);
        assert_eq!(map.len_keys(), 1);
        assert_eq!(map.inner.len(), 1);
        assert_eq!(map.capacity(), 3);

        // remove everything
        map.retain(|_n, _v| false);

        assert_eq!(map.len(), 0);
        assert_eq!(map.len_keys(), 0);
        assert_eq!(map.inner.len(), 0);
        assert_eq!(map.capacity(), 3);
    }

    #[test]
    fn entries_into_iter() {
        let mut map = HeaderMap::new();

        map.append(header::HOST, HeaderValue::from_static("duck.com"));
        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        let mut iter = map.into_iter();
        assert!(iter.next().is_some());
        assert!(iter.next().is_some());
        assert!(iter.next().is_some());
        assert!(iter.next().is_none());
    }

    #[test]
    fn iter_and_into_iter_same_order() {
        let mut map = HeaderMap::new();

        map.append(header::HOST, HeaderValue::from_static("duck.com"));
        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        let mut iter = map.iter();
        let mut into_iter = map.clone().into_iter();

        assert_eq!(iter.next().map(owned_pair), into_iter.next());
        assert_eq!(iter.next().map(owned_pair), into_iter.next());
        assert_eq!(iter.next().map(owned_pair), into_iter.next());
        assert_eq!(iter.next().map(owned_pair), into_iter.next());
    }

    #[test]
    fn get_all_and_remove_same_order() {
        let mut map = HeaderMap::new();

        map.append(header::COOKIE, HeaderValue::from_static("one=1"));
        map.append(header::COOKIE, HeaderValue::from_static("two=2"));

        let mut vals = map.get_all(header::COOKIE);
        let mut removed = map.clone().remove(header::COOKIE);

        assert_eq!(vals.next(), removed.next().as_ref());
        assert_eq!(vals.next(), removed.next().as_ref());
        assert_eq!(vals.next(), removed.next().as_ref());
    }

    #[test]
    fn get_all_iteration_order_matches_insertion_order() {
        let mut map = HeaderMap::new();

        let mut vals = map.get_all(header::COOKIE);
        assert!(vals.next().is_none());

        map.append(header::COOKIE, HeaderValue::from_static("1"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"1");
        assert!(vals.next().is_none());

        map.append(header::COOKIE, HeaderValue::from_static("2"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"1");
        assert_eq!(vals.next().unwrap().as_bytes(), b"2");
        assert!(vals.next().is_none());

        map.append(header::COOKIE, HeaderValue::from_static("3"));
        map.append(header::COOKIE, HeaderValue::from_static("4"));
        map.append(header::COOKIE, HeaderValue::from_static("5"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"1");
        assert_eq!(vals.next().unwrap().as_bytes(), b"2");
        assert_eq!(vals.next().unwrap().as_bytes(), b"3");
        assert_eq!(vals.next().unwrap().as_bytes(), b"4");
        assert_eq!(vals.next().unwrap().as_bytes(), b"5");
        assert!(vals.next().is_none());

        let _ = map.insert(header::COOKIE, HeaderValue::from_static("6"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"6");
        assert!(vals.next().is_none());

        let _ = map.insert(header::COOKIE, HeaderValue::from_static("7"));
        let _ = map.insert(header::COOKIE, HeaderValue::from_static("8"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"8");
        assert!(vals.next().is_none());

        map.append(header::COOKIE, HeaderValue::from_static("9"));
        let mut vals = map.get_all(header::COOKIE);
        assert_eq!(vals.next().unwrap().as_bytes(), b"8");
        assert_eq!(vals.next().unwrap().as_bytes(), b"9");
        assert!(vals.next().is_none());

        // check for fused-ness
        assert!(vals.next().is_none());
    }

    #[test]
    fn iter_len_counts_values() {
        let mut map = HeaderMap::new();
        map.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("c=3"));

        assert_eq!(map.iter().count(), 3);
        assert_eq!(map.iter().len(), 3);
    }

    #[test]
    fn into_iter_len_counts_values() {
        let mut map = HeaderMap::new();
        map.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("c=3"));

        assert_eq!(map.clone().into_iter().count(), 3);
        assert_eq!(map.into_iter().len(), 3);
    }

    #[test]
    fn drain_len_counts_values() {
        let mut map = HeaderMap::new();
        map.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("c=3"));

        let mut drained = map.clone();
        assert_eq!(map.drain().count(), 3);
        assert_eq!(drained.drain().len(), 3);
    }

    #[test]
    fn moving_into_an_empty_map_takes_the_table_and_drops_what_is_not_kept() {
        // roundabout patch (VENDORED.md, "Cost"): the empty map takes the other's table.
        let mut from = HeaderMap::with_capacity(20);
        from.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        from.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        from.insert(header::CONNECTION, HeaderValue::from_static("close"));
        from.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let room = from.capacity();
        let mut to = HeaderMap::new();
        to.move_from(&mut from, |name| *name != header::CONNECTION);
        assert!(from.is_empty());
        assert_eq!(to.capacity(), room, "the table itself moved");
        assert_eq!(to.len(), 3);
        let cookies: Vec<_> = to.get_all(header::SET_COOKIE).collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(!to.contains_key(header::CONNECTION));
        assert_eq!(to.get(header::CONTENT_TYPE).unwrap(), "text/plain");
    }

    /// Maps driven through every way names come and go, each lookup checked against a
    /// plain model: a name's bit may be stale, never missing.
    #[test]
    fn lookups_answer_as_the_map_holds_through_every_change() {
        use std::collections::HashMap;

        let names: Vec<HeaderName> = [
            "host",
            "connection",
            "upgrade",
            "te",
            "transfer-encoding",
            "content-length",
            "x-request-id",
            "x-forwarded-for",
            "accept",
            "accept-encoding",
            "cookie",
            "date",
            "server",
            "keep-alive",
            "proxy-connection",
            "trailer",
            "expect",
            "x-a",
            "x-b",
            "via",
        ]
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let value = HeaderValue::from_static("v");
        let mut map = HeaderMap::new();
        let mut model: HashMap<HeaderName, usize> = HashMap::new();
        for step in 0..20_000 {
            let name = &names[next(names.len())];
            match next(9) {
                0 | 1 => {
                    map.insert(name.clone(), value.clone());
                    model.insert(name.clone(), 1);
                }
                2 | 3 => {
                    map.append(name.clone(), value.clone());
                    *model.entry(name.clone()).or_default() += 1;
                }
                4 => {
                    let removed = map.remove(name).count();
                    assert_eq!(removed, model.remove(name).unwrap_or(0), "step {step}");
                }
                5 => {
                    let drop_it = names[next(names.len())].clone();
                    map.retain(|n, _| *n != drop_it);
                    model.remove(&drop_it);
                }
                6 if next(20) == 0 => {
                    if next(2) == 0 {
                        map.clear();
                    } else {
                        map.drain().take(1).for_each(drop);
                    }
                    model.clear();
                }
                7 => {
                    // Into an empty map (the tables trade) or a full one (merged).
                    let mut to = HeaderMap::new();
                    let dropped = names[next(names.len())].clone();
                    model.remove(&dropped);
                    if next(2) == 0 {
                        to.insert(names[0].clone(), value.clone());
                        *model.entry(names[0].clone()).or_default() += 1;
                    }
                    to.move_from(&mut map, |n| *n != dropped);
                    assert!(map.is_empty());
                    for n in &names {
                        assert!(!map.contains_key(n), "moved-from map holds {n}");
                    }
                    map = to;
                }
                _ => {}
            }
            for n in &names {
                let count = model.get(n).copied().unwrap_or(0);
                assert_eq!(map.contains_key(n), count > 0, "step {step}, {n}");
                assert_eq!(map.get(n).is_some(), count > 0, "step {step}, {n}");
                assert_eq!(map.get_all(n).count(), count, "step {step}, {n}");
                assert_eq!(map.get(n.as_str()).is_some(), count > 0, "step {step}, {n}");
            }
        }
    }

    #[test]
    fn a_map_is_no_larger_than_upstreams() {
        // The bits of names present take the room of upstream's per-map seed: a map grown
        // past 40 bytes grows every head, each moved several times a request.
        assert_eq!(std::mem::size_of::<HeaderMap>(), 40);
    }

    #[test]
    fn the_names_a_proxy_looks_for_have_bits_apart_from_a_plain_requests() {
        // wrk's and curl's requests: a lookup of any of these is answered by the bits alone.
        let mut map = HeaderMap::new();
        for name in [header::HOST, header::USER_AGENT, header::ACCEPT] {
            map.insert(name, HeaderValue::from_static("x"));
        }
        for absent in [
            header::CONNECTION,
            header::UPGRADE,
            header::TE,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
            header::EXPECT,
            HeaderName::from_static("x-request-id"),
        ] {
            assert!(!map.may_hold(&absent), "{absent}");
        }
    }

    #[test]
    fn the_table_a_move_leaves_is_the_next_decoded_heads() {
        // Each test has a thread, so its own spares.
        let mut answer = HeaderMap::with_capacity(12);
        let room = answer.capacity();
        let mut server = HeaderMap::new();
        server.reserve_pooled(3);
        assert!(
            server.capacity() < room,
            "no spare yet: a table of its own size"
        );
        server.insert(header::DATE, HeaderValue::from_static("now"));

        answer.move_from(&mut server, |_| true);
        assert_eq!(server.capacity(), 0, "its table went to the spares");
        assert_eq!(answer.get(header::DATE).unwrap(), "now");

        let mut next = HeaderMap::new();
        next.reserve_pooled(3);
        assert_eq!(next.capacity(), room, "the answer's old table");
        let mut after = HeaderMap::new();
        after.reserve_pooled(3);
        assert!(after.capacity() < room, "one spare, taken once");
    }

    #[test]
    fn a_large_table_is_not_kept_as_a_spare() {
        let mut answer = HeaderMap::with_capacity(200);
        let mut server = HeaderMap::new();
        server.insert(header::DATE, HeaderValue::from_static("now"));
        answer.move_from(&mut server, |_| true);
        assert!(server.capacity() > MAX_SPARE_CAPACITY, "left where it was");

        let mut next = HeaderMap::new();
        next.reserve_pooled(1);
        assert!(next.capacity() <= MAX_SPARE_CAPACITY);
    }

    #[test]
    fn a_name_keeps_one_value_inline_and_any_number_beyond() {
        // roundabout patch (VENDORED.md, "Cost"): one value inline, not four.
        // 56 bytes (upstream: 176), so a bucket of the map is 88 bytes, not 208.
        assert!(
            std::mem::size_of::<Value>() <= 56,
            "{}",
            std::mem::size_of::<Value>()
        );
        let mut map = HeaderMap::new();
        for i in 0..6 {
            map.append(header::SET_COOKIE, HeaderValue::from(i));
        }
        let all: Vec<_> = map.get_all(header::SET_COOKIE).collect();
        assert_eq!(all, ["0", "1", "2", "3", "4", "5"]);
        assert_eq!(map.remove(header::SET_COOKIE).count(), 6);
        assert!(map.is_empty());
    }

    fn owned_pair<'a>((name, val): (&'a HeaderName, &'a HeaderValue)) -> (HeaderName, HeaderValue) {
        (name.clone(), val.clone())
    }
}

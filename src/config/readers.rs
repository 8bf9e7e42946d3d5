//! Readers for the values whose serde errors would speak Rust: an enum from its config
//! spelling ([`one_of`], listing the valid ones) and durations as humantime strings
//! ([`duration`], refusing a bare number in words that say what to write).

use serde::{
    de::{self, IntoDeserializer as _},
    Deserialize, Deserializer,
};

/// Reads a unit-variant enum from its config spelling. An unknown value is refused with the
/// valid ones, `"roundrobin" is not one of round_robin, weighted_round_robin, ...`: the list
/// is the one serde's derive passes to `deserialize_enum`, so a new variant is listed by
/// itself (the config crate's own message names the Rust type instead).
pub(super) fn one_of<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let value = String::deserialize(d)?;
    T::deserialize(Spelling(&value)).map_err(de::Error::custom)
}

/// A config value as an enum's variant name; see [`one_of`].
struct Spelling<'a>(&'a str);

impl<'de> Deserializer<'de> for Spelling<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_str(self.0)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if !variants.contains(&self.0) {
            return Err(de::Error::custom(format_args!(
                "{:?} is not one of {}",
                self.0,
                variants.join(", ")
            )));
        }
        visitor.visit_enum(self.0.into_deserializer())
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

/// Durations as humantime strings (`"500ms"`, `"2s"`, `"1m"`). Read here rather than by
/// `humantime_serde` so that a bare number (`interval = 2`, which could mean seconds or
/// milliseconds) is refused in words that say what to write.
pub(super) mod duration {
    use std::{fmt, time::Duration};

    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Humantime)
    }

    const EXPECTED: &str = "a duration such as \"2s\"";

    struct Humantime;

    impl Humantime {
        /// `found` is a number without a unit: seconds or milliseconds?
        fn unitless<E: de::Error>(found: impl fmt::Display) -> Result<Duration, E> {
            Err(E::custom(format_args!(
                "expected {EXPECTED}, found {found} (a duration needs a unit: ms, s, m, h)"
            )))
        }
    }

    impl de::Visitor<'_> for Humantime {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            if s.trim().parse::<f64>().is_ok() {
                return Self::unitless(format_args!("{s:?}"));
            }
            // humantime's own reasons ("expected number at 0") do not help here.
            humantime::parse_duration(s).map_err(|_| {
                E::custom(format_args!(
                    "expected {EXPECTED}, found {s:?} (a number and a unit: ms, s, m, h)"
                ))
            })
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            Self::unitless(format_args!("the number {n}"))
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            Self::unitless(format_args!("the number {n}"))
        }

        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
            Self::unitless(format_args!("the number {n}"))
        }
    }
}

/// As [`duration`], for a key that may be left out.
pub(super) mod opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

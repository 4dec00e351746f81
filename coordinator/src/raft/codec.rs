//! Encoding of everything the coordinator stores or sends between coordinators.
//!
//! JSON, behind one format-version byte. JSON because openraft's types come with serde
//! support and the state is small (a few kilobytes per cluster), so readability during
//! an incident beats compactness; the version byte lets a later release change the
//! encoding and still read what an older one wrote, or refuse it with a clear message.

use serde::de::DeserializeOwned;
use serde::Serialize;

const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("stored with format version {0}, this coordinator reads only version {FORMAT_V1}; upgrade it")]
    UnknownFormat(u8),
    #[error("malformed value: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut buf = vec![FORMAT_V1];
    // Serializing our own plain data types to JSON cannot fail (no maps with non-string
    // keys, no custom serializers that error).
    serde_json::to_writer(&mut buf, value).expect("JSON encoding of coordinator types");
    buf
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT_V1, rest)) => Ok(serde_json::from_slice(rest)?),
        Some((&v, _)) => Err(CodecError::UnknownFormat(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let v = vec![1u64, 2, 3];
        assert_eq!(decode::<Vec<u64>>(&encode(&v)).unwrap(), v);
        assert!(matches!(decode::<Vec<u64>>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<Vec<u64>>(&[9, b'1']),
            Err(CodecError::UnknownFormat(9))
        ));
        assert!(matches!(decode::<Vec<u64>>(&[1, b'{']), Err(CodecError::Json(_))));
    }
}

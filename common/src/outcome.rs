//! What a node's failure proves about when it happened, so the coordinator knows whether
//! it may refund the query.
//!
//! Everything a researcher observes is a release (see ARCHITECTURE.md, "Observable
//! outcomes"). A node that refused a request *before reading any data* (an undecodable or
//! invalid ticket, its own policy, a version mismatch, no free query slot) refused on public
//! inputs only, so the coordinator may refund the query. Any other failure happened, or may
//! have happened, after data was read: whether it happened could depend on a participant,
//! so the query stays charged. A node says which in its gRPC status's metadata under
//! [`FAILURE_STAGE_METADATA`]; a status without it (a transport error, an older node) counts
//! as [`FailureStage::AfterData`] (fail closed).

/// gRPC metadata key of a node's error status carrying its [`FailureStage`].
pub const FAILURE_STAGE_METADATA: &str = "fedq-failure-stage";

/// When a node's request failed, relative to reading data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureStage {
    /// Refused before any row was read: the outcome depends only on the request, the
    /// catalog, the node's policy and configuration, and its load. Refundable.
    BeforeData,
    /// Failed while or after reading data, or cannot prove otherwise. Never refunded.
    AfterData,
}

impl FailureStage {
    /// The metadata value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureStage::BeforeData => "before-data",
            FailureStage::AfterData => "after-data",
        }
    }

    /// The stage a metadata value names; anything else, or no value, is
    /// [`FailureStage::AfterData`], so only an explicit claim is refunded.
    pub fn from_metadata(value: Option<&str>) -> FailureStage {
        match value {
            Some("before-data") => FailureStage::BeforeData,
            _ => FailureStage::AfterData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_before_data_claim_is_before_data() {
        for s in [FailureStage::BeforeData, FailureStage::AfterData] {
            assert_eq!(FailureStage::from_metadata(Some(s.as_str())), s);
        }
        assert_eq!(FailureStage::from_metadata(None), FailureStage::AfterData);
        assert_eq!(
            FailureStage::from_metadata(Some("Before-Data")),
            FailureStage::AfterData
        );
    }
}

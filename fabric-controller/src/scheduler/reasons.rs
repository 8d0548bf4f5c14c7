//! Why a host was filtered out, and the per-reason summary of a VM that no
//! host accepts (`0/12 hosts: 7 insufficient memory, 3 cordoned`).

use std::fmt;

/// A filter that rejected a host. The declaration order is the fixed order
/// in which filters run: a host is counted under the first one it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterReason {
    /// The host is cordoned.
    Cordoned,
    /// The host is draining.
    Draining,
    /// The host is suspect (missed heartbeats).
    NotReady,
    /// The host is dead.
    Dead,
    /// The host is not in the requested zone.
    WrongZone,
    /// Not enough vCPUs left under the overcommit ratio.
    InsufficientCpu,
    /// Not enough memory left for the VM's minimum.
    InsufficientMemory,
    /// Not enough disk space left for the VM's disks and logs.
    InsufficientDisk,
    /// A VM on the host conflicts by anti-affinity (either direction).
    AntiAffinity,
    /// The availability set already uses this fault domain more than the
    /// least-used eligible one.
    FaultDomainAlreadyUsed,
    /// The availability set already uses this update domain more than the
    /// least-used eligible one (within the chosen fault domains).
    UpdateDomainAlreadyUsed,
}

impl FilterReason {
    /// Every reason, in filter order.
    pub const ALL: [FilterReason; 11] = [
        FilterReason::Cordoned,
        FilterReason::Draining,
        FilterReason::NotReady,
        FilterReason::Dead,
        FilterReason::WrongZone,
        FilterReason::InsufficientCpu,
        FilterReason::InsufficientMemory,
        FilterReason::InsufficientDisk,
        FilterReason::AntiAffinity,
        FilterReason::FaultDomainAlreadyUsed,
        FilterReason::UpdateDomainAlreadyUsed,
    ];

    /// The name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterReason::Cordoned => "cordoned",
            FilterReason::Draining => "draining",
            FilterReason::NotReady => "not ready",
            FilterReason::Dead => "dead",
            FilterReason::WrongZone => "wrong zone",
            FilterReason::InsufficientCpu => "insufficient cpu",
            FilterReason::InsufficientMemory => "insufficient memory",
            FilterReason::InsufficientDisk => "insufficient disk",
            FilterReason::AntiAffinity => "anti-affinity",
            FilterReason::FaultDomainAlreadyUsed => "fault domain already used",
            FilterReason::UpdateDomainAlreadyUsed => "update domain already used",
        }
    }
}

impl fmt::Display for FilterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// No host accepts the VM. Each host is counted once, under the first
/// filter it fails; reasons are kept sorted by count (descending), then by
/// name. Displays as `0/12 hosts: 7 insufficient memory, 3 cordoned`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    hosts: usize,
    reasons: Vec<(FilterReason, usize)>,
}

impl Unplaceable {
    /// A summary over `hosts` hosts from per-reason counts (repeated reasons
    /// add up; zero counts are dropped).
    pub fn new(hosts: usize, counts: impl IntoIterator<Item = (FilterReason, usize)>) -> Self {
        let mut per_reason = [0usize; FilterReason::ALL.len()];
        for (reason, count) in counts {
            per_reason[reason as usize] = per_reason[reason as usize].saturating_add(count);
        }
        let mut reasons: Vec<(FilterReason, usize)> = FilterReason::ALL
            .iter()
            .zip(per_reason)
            .filter(|(_, count)| *count > 0)
            .map(|(reason, count)| (*reason, count))
            .collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_str().cmp(b.0.as_str())));
        Self { hosts, reasons }
    }

    /// Hosts considered (every registered host).
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// `(reason, hosts)` pairs, by count descending then name.
    pub fn reasons(&self) -> &[(FilterReason, usize)] {
        &self.reasons
    }

    /// Hosts rejected for `reason`.
    pub fn count(&self, reason: FilterReason) -> usize {
        self.reasons
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, count)| *count)
    }
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} hosts", self.hosts)?;
        if self.reasons.is_empty() {
            return f.write_str(": no hosts");
        }
        for (i, (reason, count)) in self.reasons.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{count} {reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unplaceable {}

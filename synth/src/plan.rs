//! The global pre-pass: site sizes, each participant's profile, and transfers.
//!
//! Everything a site needs to know about participants it shares with another site is
//! decided here, from one seeded stream, so that the sites themselves can then be
//! generated independently (and in parallel) from their own streams.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) const fn days_from_civil(y: i32, m: i32, d: i32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// First day clinical records (diagnoses, labs) may carry.
pub(crate) const RECORDS_FROM: i32 = days_from_civil(2000, 1, 1);
/// Last day clinical records may carry.
pub(crate) const RECORDS_TO: i32 = days_from_civil(2026, 12, 31);
const ENROLLED_FROM: i32 = days_from_civil(2015, 1, 1);
const ENROLLED_TO: i32 = days_from_civil(2025, 12, 31);
/// Year ages are computed at.
const REFERENCE_YEAR: i32 = 2025;

/// Target share of rare-disease participants over the whole federation.
const RARE_SHARE: f64 = 0.08;
/// Target share of severe-disease participants over the whole federation.
const SEVERE_SHARE: f64 = 0.27;
/// Share of rare-disease participants enrolled at the referral centres.
const RARE_AT_REFERRAL: f64 = 0.70;

/// Stream of the pre-pass; site `i` (0-based) uses stream `i + 1`.
const PLAN_STREAM: u64 = 0;

/// The RNG of the pre-pass.
fn plan_rng(seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(PLAN_STREAM);
    rng
}

/// The RNG of one site (0-based index): same key, its own ChaCha stream.
pub(crate) fn site_rng(seed: u64, site: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(site as u64 + 1);
    rng
}

/// A standard normal draw.
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    rng.sample(StandardNormal)
}

/// An index drawn with probability proportional to `weights`.
pub(crate) fn weighted(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len().saturating_sub(1)
}

/// Participant type (index into [`crate::reference::PARTICIPANT_TYPES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PType {
    Rare = 0,
    Severe = 1,
    General = 2,
}

/// Chronic conditions (bit flags in [`Profile::conds`]); their codes repeat over time.
pub(crate) const CHRONIC: [(u8, &str); 5] = [
    (1, "E11"),  // type 2 diabetes
    (2, "I10"),  // hypertension
    (4, "E78"),  // hyperlipidaemia
    (8, "J45"),  // asthma
    (16, "N18"), // chronic kidney disease
];
pub(crate) const E11: u8 = 1;
pub(crate) const I10: u8 = 2;
pub(crate) const E78: u8 = 4;
pub(crate) const J45: u8 = 8;
pub(crate) const N18: u8 = 16;

/// Index diseases; `disease` in a profile indexes this list.
pub(crate) const DISEASES: [&str; 17] = [
    // severe (0..9)
    "C50", "C61", "C34", "C18", "I50", "I25", "J44", "G35", "I42", // rare (9..17)
    "E75.2", "G71.0", "E84", "Q87.4", "E85", "G12.1", "D66", "E70.0",
];
pub(crate) const C50: u8 = 0;
pub(crate) const I42: u8 = 8;
pub(crate) const E84: u8 = 11;
const FIRST_RARE: u8 = 9;
pub(crate) const NO_DISEASE: u8 = u8::MAX;
/// No transfer.
pub(crate) const NO_TRANSFER: u16 = u16::MAX;

/// What a site needs to know about one participant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Profile {
    pub birth_year: i16,
    pub female: bool,
    pub ptype: PType,
    /// Bit set of [`CHRONIC`] conditions.
    pub conds: u8,
    /// Index into [`DISEASES`], or [`NO_DISEASE`].
    pub disease: u8,
    pub enrolled_on: i32,
    /// 0-based second site, or [`NO_TRANSFER`].
    pub transfer_to: u16,
}

impl Profile {
    pub(crate) fn has(&self, cond: u8) -> bool {
        self.conds & cond != 0
    }

    /// First day a record of this participant may carry.
    pub(crate) fn records_from(&self) -> i32 {
        days_from_civil(i32::from(self.birth_year), 1, 1).max(RECORDS_FROM)
    }
}

/// The global plan.
pub(crate) struct Plan {
    /// `site_start[i]..site_start[i + 1]` are the global indices enrolled at site `i`.
    pub site_start: Vec<usize>,
    pub profiles: Vec<Profile>,
    /// Per site, the sorted global indices of participants transferred in.
    pub incoming: Vec<Vec<u32>>,
}

impl Plan {
    pub(crate) fn sites(&self) -> usize {
        self.incoming.len()
    }

    pub(crate) fn home_range(&self, site: usize) -> std::ops::Range<usize> {
        self.site_start[site]..self.site_start[site + 1]
    }

    pub(crate) fn transferred(&self) -> usize {
        self.incoming.iter().map(Vec::len).sum()
    }
}

/// Site sizes: every site gets one participant, the rest is shared in proportion to
/// Zipf weights 1/rank (site01 is the largest tertiary hospital), by largest remainder.
pub(crate) fn site_sizes(sites: usize, participants: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..sites).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let rest = participants - sites;
    let quotas: Vec<f64> = weights.iter().map(|w| rest as f64 * w / total).collect();
    let mut sizes: Vec<usize> = quotas.iter().map(|q| 1 + q.floor() as usize).collect();
    let assigned: usize = sizes.iter().sum();
    let mut order: Vec<usize> = (0..sites).collect();
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order
        .iter()
        .cycle()
        .take(participants.saturating_sub(assigned))
    {
        sizes[i] += 1;
    }
    sizes
}

/// 0-based indices of the rare-disease referral centres (sites 2 and 3, plus site 5 in a
/// large federation).
pub(crate) fn referral_sites(sites: usize) -> Vec<usize> {
    match sites {
        0 | 1 => vec![],
        2 => vec![1],
        3..=19 => vec![1, 2],
        _ => vec![1, 2, 4],
    }
}

/// Build the plan. `sites >= 1` and `participants >= sites` are checked by the caller.
pub(crate) fn build(seed: u64, sites: usize, participants: usize) -> Plan {
    let sizes = site_sizes(sites, participants);
    let referral = referral_sites(sites);
    let is_referral: Vec<bool> = (0..sites).map(|i| referral.contains(&i)).collect();

    // Rare-disease share per site: most rare-disease participants sit at the referral
    // centres; the other sites make up the rest of the 8%.
    let n = participants as f64;
    let n_ref: f64 = referral.iter().map(|&i| sizes[i] as f64).sum();
    let n_other = n - n_ref;
    let target = RARE_SHARE * n;
    let (rare_ref, rare_other) = if n_ref == 0.0 || n_other == 0.0 {
        (RARE_SHARE, RARE_SHARE)
    } else {
        let r = (RARE_AT_REFERRAL * target / n_ref).min(0.6);
        (r, ((target - r * n_ref) / n_other).clamp(0.0, 1.0))
    };
    let severe_given_not_rare = SEVERE_SHARE / (1.0 - RARE_SHARE);

    let mut rng = plan_rng(seed);
    let mut site_start = Vec::with_capacity(sites + 1);
    let mut profiles = Vec::with_capacity(participants);
    let mut incoming: Vec<Vec<u32>> = vec![Vec::new(); sites];
    let mut start = 0usize;
    for (site, &size) in sizes.iter().enumerate() {
        site_start.push(start);
        let p_rare = if is_referral[site] {
            rare_ref
        } else {
            rare_other
        };
        for g in start..start + size {
            let mut p = profile(&mut rng, p_rare, severe_given_not_rare);
            if sites >= 2 {
                let p_transfer = match p.ptype {
                    PType::Rare => 0.06,
                    PType::Severe => 0.035,
                    PType::General => 0.025,
                };
                if rng.random_bool(p_transfer) {
                    let dest = transfer_destination(
                        &mut rng,
                        &sizes,
                        site,
                        (p.ptype == PType::Rare && !is_referral[site]).then_some(&referral),
                    );
                    p.transfer_to = dest as u16;
                    incoming[dest].push(g as u32);
                }
            }
            profiles.push(p);
        }
        start += size;
    }
    site_start.push(start);
    Plan {
        site_start,
        profiles,
        incoming,
    }
}

/// A second site other than `home`, weighted by site size; rare-disease participants
/// enrolled elsewhere are referred to a referral centre.
fn transfer_destination(
    rng: &mut ChaCha8Rng,
    sizes: &[usize],
    home: usize,
    referral: Option<&Vec<usize>>,
) -> usize {
    let candidates: Vec<usize> = match referral {
        Some(r) if !r.is_empty() => r.clone(),
        _ => (0..sizes.len()).filter(|&i| i != home).collect(),
    };
    let weights: Vec<f64> = candidates.iter().map(|&i| sizes[i] as f64).collect();
    candidates[weighted(rng, &weights)]
}

fn age_factor(age: f64, from: f64, span: f64) -> f64 {
    ((age - from) / span).clamp(0.0, 1.0)
}

fn profile(rng: &mut ChaCha8Rng, p_rare: f64, p_severe_given_not_rare: f64) -> Profile {
    let female = rng.random_bool(0.52);
    let ptype = if rng.random_bool(p_rare) {
        PType::Rare
    } else if rng.random_bool(p_severe_given_not_rare) {
        PType::Severe
    } else {
        PType::General
    };
    let (mean, sd) = match ptype {
        PType::Rare => (1988.0, 17.0),
        PType::Severe => (1956.0, 15.0),
        PType::General => (1966.0, 17.0),
    };
    let birth_year = (mean + sd * normal(rng)).round().clamp(1930.0, 2010.0) as i16;
    let age = f64::from(REFERENCE_YEAR - i32::from(birth_year));
    let severe = ptype == PType::Severe;

    // Diabetes and hypertension become more common with age.
    let mut conds = 0u8;
    let p_e11 =
        (0.01 + 0.24 * age_factor(age, 25.0, 55.0).powf(1.5)) * if severe { 1.4 } else { 1.0 };
    if rng.random_bool(p_e11.min(1.0)) {
        conds |= E11;
    }
    let p_i10 =
        (0.02 + 0.50 * age_factor(age, 20.0, 65.0).powf(1.3)) * if severe { 1.2 } else { 1.0 };
    if rng.random_bool(p_i10.min(1.0)) {
        conds |= I10;
    }
    if rng.random_bool(0.02 + 0.22 * age_factor(age, 25.0, 50.0)) {
        conds |= E78;
    }
    if rng.random_bool(if age < 25.0 { 0.12 } else { 0.06 }) {
        conds |= J45;
    }
    let p_n18 = 0.005
        + 0.06 * age_factor(age, 40.0, 45.0)
        + if conds & E11 != 0 { 0.08 } else { 0.0 }
        + if severe { 0.08 } else { 0.0 };
    if rng.random_bool(p_n18.min(1.0)) {
        conds |= N18;
    }

    let disease = match ptype {
        PType::General => NO_DISEASE,
        PType::Severe => {
            // Breast (women) or prostate (men) cancer is a third of the severe cases.
            let r = rng.random_range(0..12u8);
            if r < 4 {
                if female {
                    C50
                } else {
                    C50 + 1
                }
            } else {
                2 + (r - 4) % 7
            }
        }
        PType::Rare => rng.random_range(FIRST_RARE..DISEASES.len() as u8),
    };
    let enrolled_on = rng.random_range(ENROLLED_FROM..=ENROLLED_TO);
    Profile {
        birth_year,
        female,
        ptype,
        conds,
        disease,
        enrolled_on,
        transfer_to: NO_TRANSFER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn sizes_sum_and_skew() {
        for (s, p) in [(1, 1), (3, 3), (5, 20_000), (38, 772_000), (999, 1000)] {
            let sizes = site_sizes(s, p);
            assert_eq!(sizes.len(), s);
            assert_eq!(sizes.iter().sum::<usize>(), p);
            assert!(sizes.iter().all(|&n| n >= 1));
        }
        let sizes = site_sizes(38, 772_000);
        assert!(sizes[0] > 10 * sizes[37]);
    }

    #[test]
    fn transfers_go_to_one_other_site() {
        let plan = build(7, 6, 30_000);
        for (site, list) in plan.incoming.iter().enumerate() {
            assert!(list.windows(2).all(|w| w[0] < w[1]));
            for &g in list {
                let p = plan.profiles[g as usize];
                assert_eq!(usize::from(p.transfer_to), site);
                assert!(!plan.home_range(site).contains(&(g as usize)));
            }
        }
        let share = plan.transferred() as f64 / 30_000.0;
        assert!((0.02..0.045).contains(&share), "{share}");
    }
}

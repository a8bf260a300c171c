//! Generation of one site's five Parquet files from its own seeded stream.
//!
//! A site walks its participants in global-index order: those it enrolled (a contiguous
//! range) merged with those transferred in from another site (from the plan). Every table
//! therefore comes out grouped and sorted by `pid`, and the output depends only on the seed
//! and the site index, never on which thread ran it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Date32Builder, Float64Builder, Int32Builder, StringBuilder,
};
use fedq_common::Catalog;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::plan::{
    self, normal, weighted, PType, Plan, Profile, C50, CHRONIC, DISEASES, E11, E78, E84, I42, N18,
    NO_DISEASE, RECORDS_TO,
};
use crate::reference::{
    arrow_schema, GENES, LAB_TESTS, PARTICIPANT_TYPES, SEXES, SPECIMEN_KINDS, SPECIMEN_STATUSES,
    ZYGOSITIES,
};
use crate::sink::{arr, Columns, TableSink};
use crate::SynthError;

/// Most diagnoses rows one participant gets at one site.
const MAX_DIAGNOSES: usize = 15;
/// Most lab rows one participant gets at one site.
const MAX_LABS: f64 = 400.0;
/// Most variant rows one participant gets.
const MAX_VARIANTS: usize = 20;

/// Frequent non-chronic codes.
const MISC_CODES: [&str; 14] = [
    "J06.9", "K21.0", "M54.5", "F32", "R51", "Z00.0", "J18.9", "A09", "L40", "H52.1", "S52.5",
    "N39.0", "E66", "K58",
];

/// Known variants per gene (index as [`GENES`]); the first entry is the one linked to the
/// gene's disease.
const KNOWN_VARIANTS: [&[&str]; 8] = [
    &[
        "c.68_69delAG",
        "c.5266dupC",
        "c.181T>G",
        "rs80357906",
        "rs80357713",
        "rs28897672",
    ],
    &[
        "c.5946delT",
        "c.9097dupA",
        "rs80359550",
        "rs11571833",
        "rs80358981",
    ],
    &["rs429358", "rs7412"],
    &[
        "c.1521_1523delCTT",
        "c.1624G>T",
        "c.1652G>A",
        "rs113993960",
        "rs75527207",
    ],
    &["c.1060+1G>A", "c.681C>G", "rs28942078", "rs121908025"],
    &["c.1208G>A", "c.2389G>A", "rs3218713", "rs121913627"],
    &["c.59926+1G>A", "rs72648998", "rs267607155"],
    &["c.5350G>A", "rs1805124", "rs199473282", "rs7626962"],
];
/// Coding-sequence lengths, for synthetic HGVS positions.
const CDS_LEN: [u32; 8] = [5592, 10257, 954, 4443, 2583, 5808, 107_976, 6048];
const GENE_WEIGHTS: [f64; 8] = [0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.2, 0.1];
const BRCA1: u8 = 0;
const CFTR: u8 = 3;
const LDLR: u8 = 4;
const MYH7: u8 = 5;
const TTN: u8 = 6;
const BASES: [char; 4] = ['A', 'C', 'G', 'T'];

const HBA1C: u8 = 0;
const GLUCOSE: u8 = 1;
const LDL: u8 = 2;
const CREATININE: u8 = 3;

/// Rows and counts written for one site.
pub(crate) struct SiteOutput {
    pub rows: BTreeMap<String, usize>,
    pub participants: usize,
    pub transfers_in: usize,
}

struct ParticipantCols {
    pid: StringBuilder,
    sex: StringBuilder,
    birth_year: Int32Builder,
    ptype: StringBuilder,
    enrolled_on: Date32Builder,
}

impl Columns for ParticipantCols {
    fn len(&self) -> usize {
        self.birth_year.len()
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            arr(self.pid.finish()),
            arr(self.sex.finish()),
            arr(self.birth_year.finish()),
            arr(self.ptype.finish()),
            arr(self.enrolled_on.finish()),
        ]
    }
}

struct DiagnosisCols {
    pid: StringBuilder,
    code: StringBuilder,
    diagnosed_on: Date32Builder,
}

impl Columns for DiagnosisCols {
    fn len(&self) -> usize {
        self.diagnosed_on.len()
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            arr(self.pid.finish()),
            arr(self.code.finish()),
            arr(self.diagnosed_on.finish()),
        ]
    }
}

struct LabCols {
    pid: StringBuilder,
    test: StringBuilder,
    value: Float64Builder,
    measured_on: Date32Builder,
}

impl Columns for LabCols {
    fn len(&self) -> usize {
        self.measured_on.len()
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            arr(self.pid.finish()),
            arr(self.test.finish()),
            arr(self.value.finish()),
            arr(self.measured_on.finish()),
        ]
    }
}

struct SpecimenCols {
    pid: StringBuilder,
    kind: StringBuilder,
    volume_ml: Float64Builder,
    status: StringBuilder,
}

impl Columns for SpecimenCols {
    fn len(&self) -> usize {
        self.volume_ml.len()
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            arr(self.pid.finish()),
            arr(self.kind.finish()),
            arr(self.volume_ml.finish()),
            arr(self.status.finish()),
        ]
    }
}

struct VariantCols {
    pid: StringBuilder,
    gene: StringBuilder,
    variant: StringBuilder,
    zygosity: StringBuilder,
}

impl Columns for VariantCols {
    fn len(&self) -> usize {
        self.gene.len()
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            arr(self.pid.finish()),
            arr(self.gene.finish()),
            arr(self.variant.finish()),
            arr(self.zygosity.finish()),
        ]
    }
}

fn strings() -> StringBuilder {
    StringBuilder::with_capacity(1024, 8 * 1024)
}

struct Writers {
    participants: TableSink<ParticipantCols>,
    diagnoses: TableSink<DiagnosisCols>,
    labs: TableSink<LabCols>,
    specimens: TableSink<SpecimenCols>,
    variants: TableSink<VariantCols>,
}

impl Writers {
    fn create(catalog: &Catalog, dir: &Path) -> Result<Self, SynthError> {
        let schema = |name: &str| {
            catalog
                .table(name)
                .map(|t| Arc::new(arrow_schema(t)))
                .ok_or_else(|| {
                    SynthError::Internal(format!("reference catalog has no table {name}"))
                })
        };
        let path = |name: &str| dir.join(format!("{name}.parquet"));
        Ok(Writers {
            participants: TableSink::create(
                &path("participants"),
                schema("participants")?,
                ParticipantCols {
                    pid: strings(),
                    sex: strings(),
                    birth_year: Int32Builder::new(),
                    ptype: strings(),
                    enrolled_on: Date32Builder::new(),
                },
            )?,
            diagnoses: TableSink::create(
                &path("diagnoses"),
                schema("diagnoses")?,
                DiagnosisCols {
                    pid: strings(),
                    code: strings(),
                    diagnosed_on: Date32Builder::new(),
                },
            )?,
            labs: TableSink::create(
                &path("labs"),
                schema("labs")?,
                LabCols {
                    pid: strings(),
                    test: strings(),
                    value: Float64Builder::new(),
                    measured_on: Date32Builder::new(),
                },
            )?,
            specimens: TableSink::create(
                &path("specimens"),
                schema("specimens")?,
                SpecimenCols {
                    pid: strings(),
                    kind: strings(),
                    volume_ml: Float64Builder::new(),
                    status: strings(),
                },
            )?,
            variants: TableSink::create(
                &path("variants"),
                schema("variants")?,
                VariantCols {
                    pid: strings(),
                    gene: strings(),
                    variant: strings(),
                    zygosity: strings(),
                },
            )?,
        })
    }

    fn maybe_flush(&mut self) -> Result<(), SynthError> {
        self.participants.maybe_flush()?;
        self.diagnoses.maybe_flush()?;
        self.labs.maybe_flush()?;
        self.specimens.maybe_flush()?;
        self.variants.maybe_flush()
    }

    fn close(self) -> Result<BTreeMap<String, usize>, SynthError> {
        let mut rows = BTreeMap::new();
        rows.insert("participants".to_string(), self.participants.close()?);
        rows.insert("diagnoses".to_string(), self.diagnoses.close()?);
        rows.insert("labs".to_string(), self.labs.close()?);
        rows.insert("specimens".to_string(), self.specimens.close()?);
        rows.insert("variants".to_string(), self.variants.close()?);
        Ok(rows)
    }
}

/// A variant string: a known one, or a synthetic substitution `c.<pos><ref>><alt>`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Known(&'static str),
    Substitution { pos: u32, from: u8, to: u8 },
}

/// Per-participant scratch space, reused to avoid allocations.
#[derive(Default)]
struct Scratch {
    diagnoses: Vec<(i32, &'static str)>,
    labs: Vec<(i32, u8, Option<f64>)>,
    variants: Vec<(u8, Variant, bool)>,
    text: String,
}

/// Generate one site (0-based `site`) into `dir`.
pub(crate) fn generate_site(
    plan: &Plan,
    catalog: &Catalog,
    seed: u64,
    site: usize,
    dir: &Path,
) -> Result<SiteOutput, SynthError> {
    let mut rng = plan::site_rng(seed, site);
    let mut w = Writers::create(catalog, dir)?;
    let home = plan.home_range(site);
    let incoming = &plan.incoming[site];
    let mut scratch = Scratch::default();
    let mut pid = String::with_capacity(16);
    let (mut h, mut t) = (home.start, 0usize);
    loop {
        let next_in = incoming.get(t).map(|&g| g as usize);
        let (g, is_home) = match (h < home.end, next_in) {
            (false, None) => break,
            (true, Some(b)) if b < h => {
                t += 1;
                (b, false)
            }
            (true, _) => {
                h += 1;
                (h - 1, true)
            }
            (false, Some(b)) => {
                t += 1;
                (b, false)
            }
        };
        let p = &plan.profiles[g];
        pid.clear();
        let _ = write!(pid, "p{g:07}");
        if is_home {
            participant_row(&mut w.participants.cols, &pid, p);
        }
        diagnoses(
            &mut rng,
            &mut w.diagnoses.cols,
            &mut scratch,
            &pid,
            p,
            is_home,
        );
        labs(&mut rng, &mut w.labs.cols, &mut scratch, &pid, p, is_home);
        specimens(&mut rng, &mut w.specimens.cols, &pid, is_home);
        if is_home {
            variants(&mut rng, &mut w.variants.cols, &mut scratch, &pid, p);
        }
        w.maybe_flush()?;
    }
    Ok(SiteOutput {
        rows: w.close()?,
        participants: home.len(),
        transfers_in: incoming.len(),
    })
}

fn participant_row(c: &mut ParticipantCols, pid: &str, p: &Profile) {
    c.pid.append_value(pid);
    c.sex.append_value(SEXES[usize::from(!p.female)]);
    c.birth_year.append_value(i32::from(p.birth_year));
    c.ptype.append_value(PARTICIPANT_TYPES[p.ptype as usize]);
    c.enrolled_on.append_value(p.enrolled_on);
}

/// Small Poisson draw (Knuth), capped at 50.
fn poisson(rng: &mut ChaCha8Rng, lambda: f64) -> usize {
    let limit = (-lambda).exp();
    let mut k = 0;
    let mut prod = rng.random::<f64>();
    while prod > limit && k < 50 {
        k += 1;
        prod *= rng.random::<f64>();
    }
    k
}

fn diagnoses(
    rng: &mut ChaCha8Rng,
    c: &mut DiagnosisCols,
    s: &mut Scratch,
    pid: &str,
    p: &Profile,
    is_home: bool,
) {
    let (lo, hi) = (p.records_from(), RECORDS_TO);
    let rows = &mut s.diagnoses;
    rows.clear();
    for (bit, code) in CHRONIC {
        if !p.has(bit) {
            continue;
        }
        if is_home {
            // Chronic codes are coded again at later visits.
            let first = rng.random_range(lo..=hi);
            rows.push((first, code));
            let repeats = weighted(rng, &[0.35, 0.30, 0.20, 0.15]);
            for _ in 0..repeats {
                rows.push((rng.random_range(first..=hi), code));
            }
        } else if rng.random_bool(0.6) {
            rows.push((rng.random_range(lo..=hi), code));
        }
    }
    if p.disease != NO_DISEASE {
        let code = DISEASES[usize::from(p.disease)];
        let first = rng.random_range(lo..=hi);
        rows.push((first, code));
        if is_home {
            for _ in 0..rng.random_range(0..=2) {
                rows.push((rng.random_range(first..=hi), code));
            }
        }
    }
    let lambda = match (is_home, p.ptype) {
        (false, _) => 0.4,
        (true, PType::General) => 0.7,
        (true, PType::Severe) => 1.5,
        (true, PType::Rare) => 1.2,
    };
    for _ in 0..poisson(rng, lambda) {
        let code = MISC_CODES[rng.random_range(0..MISC_CODES.len())];
        rows.push((rng.random_range(lo..=hi), code));
    }
    rows.sort_unstable();
    rows.truncate(MAX_DIAGNOSES);
    for &(day, code) in rows.iter() {
        c.pid.append_value(pid);
        c.code.append_value(code);
        c.diagnosed_on.append_value(day);
    }
}

/// Round to `digits` decimals (dividing by a power of ten, so 11.1 stays 11.1).
fn round_to(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

/// A clean value of a lab test for this participant, in the usual unit and precision.
fn lab_value(rng: &mut ChaCha8Rng, test: u8, p: &Profile) -> f64 {
    let z = normal(rng);
    match test {
        HBA1C => {
            let (m, sd) = if p.has(E11) { (7.4, 1.3) } else { (5.4, 0.4) };
            round_to((m + sd * z).clamp(4.0, 14.0), 1)
        }
        GLUCOSE => {
            let (m, sd) = if p.has(E11) {
                (160.0, 50.0)
            } else {
                (95.0, 14.0)
            };
            (m + sd * z).clamp(60.0, 350.0).round()
        }
        LDL => {
            let (m, sd) = if p.has(E78) {
                (175.0, 35.0)
            } else {
                (115.0, 32.0)
            };
            (m + sd * z).clamp(40.0, 250.0).round()
        }
        _ => {
            let (median, sigma): (f64, f64) = if p.has(N18) { (2.4, 0.5) } else { (0.9, 0.22) };
            round_to((median.ln() + sigma * z).exp().clamp(0.4, 8.0), 2)
        }
    }
}

/// The mess real lab data has: NULLs, wrong units, sentinel codes and outliers.
fn messy(rng: &mut ChaCha8Rng, test: u8, v: f64) -> Option<f64> {
    let u = rng.random::<f64>();
    if u < 0.005 {
        return None;
    }
    if u < 0.008 {
        // Reported in the other common unit.
        return Some(match test {
            HBA1C => ((v - 2.15) * 10.929).round(), // mmol/mol
            GLUCOSE => round_to(v / 18.016, 1),     // mmol/L
            LDL => round_to(v / 38.67, 2),          // mmol/L
            _ => (v * 88.42).round(),               // µmol/L
        });
    }
    if u < 0.010 {
        return Some(if rng.random_bool(0.5) { -1.0 } else { 9999.0 });
    }
    if u < 0.015 {
        // A decimal slip, or an extreme but real result.
        let f = if rng.random_bool(0.5) {
            10.0
        } else {
            rng.random_range(2.5..6.0)
        };
        return Some(round_to(v * f, 2));
    }
    Some(v)
}

fn labs(
    rng: &mut ChaCha8Rng,
    c: &mut LabCols,
    s: &mut Scratch,
    pid: &str,
    p: &Profile,
    is_home: bool,
) {
    // Heavy-tailed: lognormal count, median about 6, a few participants with hundreds.
    let (mut median, sigma) = if is_home { (4.5, 1.2) } else { (2.5, 0.9) };
    if p.has(E11) {
        median *= 1.8;
    }
    if p.has(N18) {
        median *= 1.6;
    }
    match p.ptype {
        PType::Severe => median *= 1.3,
        PType::Rare => median *= 1.2,
        PType::General => {}
    }
    let n = (median * (sigma * normal(rng)).exp()).round().min(MAX_LABS) as usize;
    let mut weights = [0.12, 0.33, 0.30, 0.25];
    if p.has(E11) {
        weights[usize::from(HBA1C)] += 0.35;
        weights[usize::from(GLUCOSE)] += 0.15;
    }
    if p.has(E78) {
        weights[usize::from(LDL)] += 0.25;
    }
    if p.has(N18) {
        weights[usize::from(CREATININE)] += 0.35;
    }
    let (lo, hi) = (p.records_from(), RECORDS_TO);
    let rows = &mut s.labs;
    rows.clear();
    for _ in 0..n {
        let test = weighted(rng, &weights) as u8;
        let clean = lab_value(rng, test, p);
        let value = messy(rng, test, clean);
        rows.push((rng.random_range(lo..=hi), test, value));
    }
    rows.sort_by_key(|&(day, test, _)| (day, test));
    for &(day, test, value) in rows.iter() {
        c.pid.append_value(pid);
        c.test.append_value(LAB_TESTS[usize::from(test)]);
        c.value.append_option(value);
        c.measured_on.append_value(day);
    }
}

fn specimens(rng: &mut ChaCha8Rng, c: &mut SpecimenCols, pid: &str, is_home: bool) {
    let n = if is_home {
        1 + weighted(rng, &[0.35, 0.30, 0.20, 0.15])
    } else {
        1 + weighted(rng, &[0.7, 0.3])
    };
    for _ in 0..n {
        let kind = weighted(rng, &[0.35, 0.25, 0.25, 0.15]);
        let volume = match kind {
            0 => rng.random_range(2.0..10.0),
            1 | 2 => (1.5f64.ln() + 0.5 * normal(rng)).exp().clamp(0.5, 10.0),
            _ if rng.random_bool(0.03) => rng.random_range(20.0..50.0),
            _ => rng.random_range(5.0..10.0),
        };
        let status = usize::from(rng.random_bool(0.08));
        c.pid.append_value(pid);
        c.kind.append_value(SPECIMEN_KINDS[kind]);
        c.volume_ml.append_value(round_to(volume, 1));
        c.status.append_value(SPECIMEN_STATUSES[status]);
    }
}

fn known(gene: u8, i: usize) -> Variant {
    let list = KNOWN_VARIANTS[usize::from(gene)];
    Variant::Known(list[i % list.len()])
}

fn variants(rng: &mut ChaCha8Rng, c: &mut VariantCols, s: &mut Scratch, pid: &str, p: &Profile) {
    let rows = &mut s.variants;
    rows.clear();
    // Variants linked to the participant's disease.
    if p.disease == C50 && rng.random_bool(0.3) {
        // BRCA1 or BRCA2, enriched among breast-cancer patients.
        let gene = BRCA1 + u8::from(rng.random_bool(0.4));
        rows.push((gene, known(gene, 0), false));
    }
    if p.disease == E84 {
        if rng.random_bool(0.7) {
            rows.push((CFTR, known(CFTR, 0), true));
        } else {
            rows.push((CFTR, known(CFTR, 0), false));
            rows.push((CFTR, known(CFTR, 1), false));
        }
    }
    if p.disease == I42 && rng.random_bool(0.35) {
        let gene = if rng.random_bool(0.5) { MYH7 } else { TTN };
        rows.push((gene, known(gene, 0), false));
    }
    if p.has(E78) && rng.random_bool(0.15) {
        rows.push((LDLR, known(LDLR, 0), false));
    }
    // Most participants have 0-3 reported variants; rare-disease participants (sequenced
    // more deeply) have more.
    let mut n = match weighted(rng, &[0.45, 0.25, 0.13, 0.08, 0.09]) {
        4 => rng.random_range(4..=MAX_VARIANTS),
        k => k,
    };
    if p.ptype == PType::Rare {
        n += rng.random_range(2..=6);
    }
    let n = n.min(MAX_VARIANTS);
    // A duplicate report of the same variant is dropped; the attempts are bounded.
    for _ in 0..3 * MAX_VARIANTS {
        if rows.len() >= n {
            break;
        }
        let gene = weighted(rng, &GENE_WEIGHTS) as u8;
        let variant = if rng.random_bool(0.75) {
            known(
                gene,
                rng.random_range(0..KNOWN_VARIANTS[usize::from(gene)].len()),
            )
        } else {
            let from = rng.random_range(0..4u8);
            Variant::Substitution {
                pos: rng.random_range(1..=CDS_LEN[usize::from(gene)]),
                from,
                to: (from + rng.random_range(1..4u8)) % 4,
            }
        };
        let hom = rng.random_bool(0.12);
        if !rows.iter().any(|&(g, v, _)| g == gene && v == variant) {
            rows.push((gene, variant, hom));
        }
    }
    rows.truncate(MAX_VARIANTS);
    for &(gene, variant, hom) in rows.iter() {
        c.pid.append_value(pid);
        c.gene.append_value(GENES[usize::from(gene)]);
        match variant {
            Variant::Known(v) => c.variant.append_value(v),
            Variant::Substitution { pos, from, to } => {
                s.text.clear();
                let _ = write!(
                    s.text,
                    "c.{pos}{}>{}",
                    BASES[usize::from(from)],
                    BASES[usize::from(to)]
                );
                c.variant.append_value(&s.text);
            }
        }
        c.zygosity.append_value(ZYGOSITIES[usize::from(hom)]);
    }
}

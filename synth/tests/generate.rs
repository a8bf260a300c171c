//! End-to-end tests of the generator: determinism, schema and catalog agreement, configs,
//! and the realism properties the rest of fedq relies on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Date32Type, Float64Type, Int32Type};
use fedq_common::{Catalog, Policy};
use fedq_synth::{
    generate, generate_with_threads, reference_catalog, SynthConfig, SynthError, SynthSummary,
    TABLES,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn config(dir: &Path, sites: usize, participants: usize, seed: u64) -> SynthConfig {
    SynthConfig {
        sites,
        participants,
        seed,
        out_dir: dir.to_path_buf(),
        base_port: 47_000,
    }
}

fn read(path: &Path) -> (arrow::datatypes::SchemaRef, RecordBatch) {
    let file = fs::File::open(path).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().collect::<Result<_, _>>().unwrap();
    let batch = arrow::compute::concat_batches(&schema, &batches).unwrap();
    (schema, batch)
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    batch
        .column_by_name(name)
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap().to_string())
        .collect()
}

/// Rows per pid, in file order of first appearance.
fn rows_per_pid(pids: &[String]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for p in pids {
        *m.entry(p.as_str()).or_insert(0) += 1;
    }
    m
}

fn table_path(summary: &SynthSummary, site: usize, table: &str) -> std::path::PathBuf {
    summary.sites[site].dir.join(format!("{table}.parquet"))
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let sa = generate_with_threads(&config(a.path(), 3, 2_000, 42), 3).unwrap();
    let sb = generate_with_threads(&config(b.path(), 3, 2_000, 42), 1).unwrap();
    let sc = generate(&config(c.path(), 3, 2_000, 43)).unwrap();
    let mut differs = 0;
    for site in 0..3 {
        for t in TABLES {
            let fa = fs::read(table_path(&sa, site, t)).unwrap();
            let fb = fs::read(table_path(&sb, site, t)).unwrap();
            let fc = fs::read(table_path(&sc, site, t)).unwrap();
            assert!(fa == fb, "site {site} table {t} differs for the same seed");
            differs += usize::from(fa != fc);
        }
    }
    assert_eq!(differs, 15, "a different seed must change every file");
    assert_eq!(sa.sites, {
        let mut s = sb.sites.clone();
        for (x, y) in s.iter_mut().zip(&sa.sites) {
            x.dir = y.dir.clone();
            x.node_config_path = y.node_config_path.clone();
        }
        s
    });
    assert_eq!(
        fs::read(&sa.catalog_path).unwrap(),
        fs::read(&sb.catalog_path).unwrap()
    );
}

#[test]
fn catalog_schemas_and_configs() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&config(dir.path(), 3, 2_000, 7)).unwrap();
    assert_eq!(summary.catalog_path, dir.path().join("catalog.toml"));

    // The catalog round-trips and every file matches it exactly.
    let catalog = Catalog::load(&summary.catalog_path).unwrap();
    assert_eq!(catalog, reference_catalog());
    let text = fs::read_to_string(&summary.catalog_path).unwrap();
    assert!(text.starts_with("# fedq catalog"));
    assert!(text.contains("privacy officer"));
    for site in &summary.sites {
        for t in TABLES {
            let (schema, batch) = read(&site.dir.join(format!("{t}.parquet")));
            let spec = catalog.table(t).unwrap();
            assert_eq!(schema.fields().len(), spec.columns.len(), "{t}");
            for (f, c) in schema.fields().iter().zip(&spec.columns) {
                assert_eq!(f.name(), &c.name, "{t}");
                assert_eq!(f.data_type(), &c.ty.arrow_type(), "{t}.{}", c.name);
                assert_eq!(f.is_nullable(), c.nullable, "{t}.{}", c.name);
            }
            assert_eq!(batch.num_rows(), site.rows[t], "{} {t}", site.site);
            // Public domains hold every value that occurs.
            for c in &spec.columns {
                if let Some(domain) = &c.public_values {
                    let domain: HashSet<String> = domain.iter().map(|v| v.to_string()).collect();
                    for v in strings(&batch, &c.name) {
                        assert!(domain.contains(&v), "{t}.{}: {v}", c.name);
                    }
                }
            }
        }
    }

    // Coordinator config.
    let coord: toml::Value =
        toml::from_str(&fs::read_to_string(&summary.coordinator_config_path).unwrap()).unwrap();
    assert_eq!(coord["listen"].as_str(), Some("127.0.0.1:47000"));
    assert_eq!(coord["catalog"].as_str(), Some("catalog.toml"));
    let policy: Policy = coord["policy"].clone().try_into().unwrap();
    policy.validate().unwrap();
    assert_eq!(policy.min_reported_count, 11);
    let nodes = coord["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["site"].as_str().unwrap(), format!("site{:02}", i + 1));
        assert_eq!(
            n["endpoint"].as_str().unwrap(),
            format!("https://127.0.0.1:{}", 47_001 + i)
        );
    }
    let researchers = coord["researchers"].as_array().unwrap();
    assert_eq!(researchers.len(), 2);
    assert_eq!(summary.researcher_password_paths.len(), 2);
    for ((name, path), r) in summary.researcher_password_paths.iter().zip(researchers) {
        assert_eq!(r["name"].as_str(), Some(name.as_str()));
        let password = fs::read_to_string(path).unwrap();
        assert!(password.ends_with('\n'));
        let password = password.trim_end();
        assert_eq!(password.len(), 40);
        let hash = r["password_argon2"].as_str().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains(password));
        {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let parsed = PasswordHash::new(hash).unwrap();
            assert!(argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }
    assert_eq!(researchers[0]["epsilon_budget"].as_float(), Some(50.0));
    assert_eq!(researchers[1]["epsilon_budget"].as_float(), Some(5.0));

    // Node configs.
    for (i, site) in summary.sites.iter().enumerate() {
        let node: toml::Value =
            toml::from_str(&fs::read_to_string(&site.node_config_path).unwrap()).unwrap();
        assert_eq!(node["site"].as_str(), Some(site.site.as_str()));
        let listen = format!("127.0.0.1:{}", 47_001 + i);
        assert_eq!(node["listen"].as_str(), Some(listen.as_str()));
        assert_eq!(site.listen, listen);
        assert_eq!(node["catalog"].as_str(), Some("../../catalog.toml"));
        // mTLS: this site's certificate, the federation CA, the coordinator allowed.
        let tls = &node["tls"];
        assert_eq!(
            tls["cert"].as_str(),
            Some(format!("../../certs/{}.pem", site.site).as_str())
        );
        assert!(site.dir.join(tls["ca"].as_str().unwrap()).is_file());
        assert!(site.dir.join(tls["key"].as_str().unwrap()).is_file());
        assert_eq!(tls["allowed_coordinators"][0].as_str(), Some("coordinator"));
        let catalog_from_node = site.dir.join("../../catalog.toml");
        assert_eq!(Catalog::load(&catalog_from_node).unwrap(), catalog);
        for t in TABLES {
            let p = node["tables"][t]["path"].as_str().unwrap();
            assert!(site.dir.join(p).is_file(), "{t}");
        }
    }
}

#[test]
fn realistic_federation() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&config(dir.path(), 5, 20_000, 2024)).unwrap();
    assert_eq!(summary.participants, 20_000);

    // Participants: unique pids, the 8/27/65 mix, rare disease concentrated at sites 2-3.
    let mut enrolled_at: HashMap<String, usize> = HashMap::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let mut rare_per_site = vec![0usize; 5];
    let mut birth_years: HashMap<String, i32> = HashMap::new();
    for (site, rare_here) in rare_per_site.iter_mut().enumerate() {
        let (_, batch) = read(&table_path(&summary, site, "participants"));
        let pids = strings(&batch, "pid");
        let ptypes = strings(&batch, "participant_type");
        let years = batch
            .column_by_name("birth_year")
            .unwrap()
            .as_primitive::<Int32Type>();
        let enrolled = batch
            .column_by_name("enrolled_on")
            .unwrap()
            .as_primitive::<Date32Type>();
        for (i, (p, t)) in pids.iter().zip(&ptypes).enumerate() {
            assert!(enrolled_at.insert(p.clone(), site).is_none(), "{p} twice");
            *types.entry(t.clone()).or_default() += 1;
            if t == "rare_disease" {
                *rare_here += 1;
            }
            let y = years.value(i);
            assert!((1930..=2010).contains(&y), "{y}");
            birth_years.insert(p.clone(), y);
            // 2015-01-01 ..= 2025-12-31
            assert!((16_436..=20_453).contains(&enrolled.value(i)));
        }
        assert!(!pids.is_empty(), "every site has participants");
        assert_eq!(summary.sites[site].participants, pids.len());
    }
    assert_eq!(enrolled_at.len(), 20_000);
    let share = |t: &str| types[t] as f64 / 20_000.0;
    assert!((share("rare_disease") - 0.08).abs() < 0.02, "{types:?}");
    assert!((share("severe_disease") - 0.27).abs() < 0.03, "{types:?}");
    assert!((share("general") - 0.65).abs() < 0.03, "{types:?}");
    let rare: usize = rare_per_site.iter().sum();
    assert!(
        rare_per_site[1] + rare_per_site[2] > rare / 2,
        "{rare_per_site:?}"
    );
    // Skewed sizes: site01 is the largest.
    let sizes: Vec<usize> = summary.sites.iter().map(|s| s.participants).collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
    assert!(sizes[0] > 2 * sizes[4], "{sizes:?}");

    // Every table is grouped by pid; every pid is known; transfers reach exactly 2 sites.
    let mut sites_of: HashMap<String, HashSet<usize>> = HashMap::new();
    let mut total_rows: BTreeMap<String, usize> = BTreeMap::new();
    for site in 0..5 {
        for t in TABLES {
            let (_, batch) = read(&table_path(&summary, site, t));
            *total_rows.entry(t.to_string()).or_default() += batch.num_rows();
            let pids = strings(&batch, "pid");
            assert!(pids.windows(2).all(|w| w[0] <= w[1]), "{t} sorted by pid");
            for p in pids {
                let home = enrolled_at[&p];
                if home != site {
                    assert!(
                        ["diagnoses", "labs", "specimens"].contains(&t),
                        "{t} has a row of {p} away from home"
                    );
                }
                sites_of.entry(p).or_default().insert(site);
            }
        }
    }
    assert_eq!(total_rows, summary.total_rows);
    let max_sites = sites_of.values().map(HashSet::len).max().unwrap();
    assert_eq!(max_sites, 2, "a participant is at most at 2 sites");
    let two = sites_of.values().filter(|s| s.len() == 2).count();
    assert_eq!(two, summary.transferred_participants);
    let share = two as f64 / 20_000.0;
    assert!((0.015..0.05).contains(&share), "transfers {share}");

    // Labs: heavy-tailed counts at the largest site, clinical mess present.
    let (_, labs) = read(&table_path(&summary, 0, "labs"));
    let pids = strings(&labs, "pid");
    let mut counts: Vec<usize> = rows_per_pid(&pids).into_values().collect();
    counts.sort_unstable();
    let median = counts[counts.len() / 2];
    let max = *counts.last().unwrap();
    assert!((4..=8).contains(&median), "median labs {median}");
    assert!(max > 100 && max <= 400, "max labs {max}");
    let values = labs
        .column_by_name("value")
        .unwrap()
        .as_primitive::<Float64Type>();
    let nulls = values.null_count() as f64 / values.len() as f64;
    assert!((0.002..0.01).contains(&nulls), "null share {nulls}");
    let vals: Vec<f64> = values.iter().flatten().collect();
    assert!(vals.contains(&9999.0) && vals.contains(&-1.0), "sentinels");
    let above = vals.iter().filter(|v| **v > 500.0).count();
    assert!(above > 0, "values above the clamp bound");
    let tests = strings(&labs, "test");
    for (t, v) in tests.iter().zip(values.iter()) {
        if let Some(v) = v {
            assert!(v.is_finite());
            if t == "HbA1c" && v > 0.0 && v < 1000.0 {
                // Either % (4-14, or an outlier) or mmol/mol (wrong unit, about 20-130).
                assert!(v >= 4.0, "{v}");
            }
        }
    }
    let days = labs
        .column_by_name("measured_on")
        .unwrap()
        .as_primitive::<Date32Type>();
    // 2000-01-01 ..= 2026-12-31
    assert!(days.values().iter().all(|d| (10_957..=20_818).contains(d)));

    // Diagnoses: 0-15 per participant, chronic codes repeat, E11 more common with age.
    let mut e11_by_age = [(0usize, 0usize); 2]; // (with E11, total) for born >= 1970, < 1970
    let mut repeated_e11 = 0;
    for site in 0..5 {
        let (_, d) = read(&table_path(&summary, site, "diagnoses"));
        let pids = strings(&d, "pid");
        let codes = strings(&d, "code");
        assert!(rows_per_pid(&pids).values().all(|&n| n <= 15));
        let mut e11: HashMap<&str, usize> = HashMap::new();
        for (p, c) in pids.iter().zip(&codes) {
            if c == "E11" {
                *e11.entry(p.as_str()).or_default() += 1;
            }
        }
        repeated_e11 += e11.values().filter(|&&n| n >= 2).count();
        let (_, parts) = read(&table_path(&summary, site, "participants"));
        for p in strings(&parts, "pid") {
            let old = usize::from(birth_years[&p] < 1970);
            e11_by_age[old].1 += 1;
            e11_by_age[old].0 += usize::from(e11.contains_key(p.as_str()));
        }
    }
    assert!(repeated_e11 > 0, "chronic codes repeat");
    let rate = |(k, n): (usize, usize)| k as f64 / n as f64;
    assert!(
        rate(e11_by_age[1]) > 1.5 * rate(e11_by_age[0]),
        "{e11_by_age:?}"
    );

    // Specimens 1-4 per participant at home; variants at most 20, mostly 0-3.
    for site in 0..5 {
        let (_, s) = read(&table_path(&summary, site, "specimens"));
        let pids = strings(&s, "pid");
        let per = rows_per_pid(&pids);
        for (p, n) in &per {
            if enrolled_at[*p] == site {
                assert!((1..=4).contains(n), "{p}: {n} specimens");
            } else {
                assert!((1..=2).contains(n), "{p}: {n} specimens");
            }
        }
        let home = enrolled_at.values().filter(|&&h| h == site).count();
        let at_home = per.keys().filter(|p| enrolled_at[**p] == site).count();
        assert_eq!(home, at_home, "every participant has a specimen");
        let volumes = s
            .column_by_name("volume_ml")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert!(volumes.values().iter().all(|v| (0.5..=50.0).contains(v)));
    }
    let mut variant_counts = Vec::new();
    for site in 0..5 {
        let (_, v) = read(&table_path(&summary, site, "variants"));
        let pids = strings(&v, "pid");
        let per = rows_per_pid(&pids);
        let home = summary.sites[site].participants;
        variant_counts.extend(per.values().copied());
        variant_counts.extend(std::iter::repeat_n(0, home - per.len()));
    }
    assert_eq!(variant_counts.len(), 20_000);
    assert!(variant_counts.iter().all(|&n| n <= 20));
    let low = variant_counts.iter().filter(|&&n| n <= 3).count();
    assert!(low as f64 > 0.75 * 20_000.0, "{low}");
    assert!(variant_counts.iter().any(|&n| n >= 15));
}

#[test]
fn invalid_config_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (sites, participants, port) in [(0, 10, 1000), (4, 3, 1000), (1000, 2000, 1000)] {
        let cfg = SynthConfig {
            sites,
            participants,
            seed: 1,
            out_dir: out.clone(),
            base_port: port,
        };
        let e = generate(&cfg).unwrap_err();
        assert!(matches!(e, SynthError::InvalidConfig(_)), "{e}");
    }
    let cfg = SynthConfig {
        sites: 10,
        participants: 100,
        seed: 1,
        out_dir: out.clone(),
        base_port: 65_530,
    };
    let e = generate(&cfg).unwrap_err().to_string();
    assert!(e.contains("65535"), "{e}");
    assert!(!out.exists(), "nothing written for an invalid config");
}

#[test]
fn unwritable_output_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let cfg = config(&file.join("out"), 1, 10, 1);
    let e = generate(&cfg).unwrap_err();
    assert!(matches!(e, SynthError::CreateDir { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cannot create output directory"), "{msg}");
    assert!(msg.contains("choose a writable --out"), "{msg}");
}

#[test]
fn one_site_federation() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&config(dir.path(), 1, 1, 3)).unwrap();
    assert_eq!(summary.sites.len(), 1);
    assert_eq!(summary.sites[0].rows["participants"], 1);
    assert_eq!(summary.transferred_participants, 0);
    let (_, batch) = read(&table_path(&summary, 0, "participants"));
    assert_eq!(strings(&batch, "pid"), vec!["p0000000".to_string()]);
}

#[test]
fn rerun_with_fewer_sites_removes_stale_site_directories() {
    let dir = tempfile::tempdir().unwrap();
    generate(&config(dir.path(), 4, 400, 1)).unwrap();
    let s = generate(&config(dir.path(), 2, 400, 1)).unwrap();
    let mut left: Vec<String> = fs::read_dir(dir.path().join("sites"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["site01", "site02"]);
    assert_eq!(s.sites.len(), 2);

    // A stale directory holding anything else is not deleted.
    generate(&config(dir.path(), 3, 400, 1)).unwrap();
    fs::write(dir.path().join("sites/site03/notes.txt"), "mine").unwrap();
    let e = generate(&config(dir.path(), 2, 400, 1)).unwrap_err();
    assert!(matches!(e, SynthError::StaleOutput { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert!(dir.path().join("sites/site03/notes.txt").is_file());
}

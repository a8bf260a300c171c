//! `fedq demo`: a small synthetic federation on loopback, a few research queries, and their
//! noisy answers beside the exact ones (the exact ones for the demo only).

use std::path::PathBuf;

use datafusion::arrow::util::pretty::pretty_format_batches;

use crate::exact::union_context;
use crate::federation::{FederationOptions, LocalFederation};
use crate::render::render;
use crate::CliError;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Number of sites.
    pub sites: usize,
    /// Number of participants.
    pub participants: usize,
    /// Seed of the synthetic data.
    pub seed: u64,
    /// Keep the federation running after the queries (`--serve`).
    pub serve: bool,
    /// Coordinator address when serving.
    pub listen: std::net::SocketAddr,
    /// Where to write the federation; a temporary directory if `None`.
    pub dir: Option<PathBuf>,
    /// When serving, write `{"url":..,"token":..,"dir":..}` here once ready (for scripts).
    pub ready_file: Option<PathBuf>,
    /// Serve the researcher endpoint over TLS with the synthetic coordinator certificate.
    pub researcher_tls: bool,
}

/// The example research queries, with what each shows.
pub const DEMO_QUERIES: &[(&str, &str)] = &[
    (
        "Participants by sex",
        "SELECT sex, COUNT(*) AS participants FROM participants GROUP BY sex ORDER BY sex",
    ),
    (
        "Mean birth year by participant type (AVG is centred on the bounds' midpoint)",
        "SELECT participant_type, COUNT(*) AS n, AVG(birth_year) AS mean_birth_year FROM participants GROUP BY participant_type ORDER BY participant_type",
    ),
    (
        "Recent lab results: count and mean value per test (values clamped to [0, 500])",
        "SELECT test, COUNT(*) AS results, AVG(value) AS mean_value FROM labs WHERE measured_on >= DATE '2020-01-01' GROUP BY test ORDER BY test",
    ),
    (
        "Participants by decade of birth (the decades follow from birth_year's bounds [1900, 2030], so empty ones are released too)",
        "SELECT birth_year / 10 * 10 AS decade, COUNT(*) AS n FROM participants GROUP BY birth_year / 10 * 10 ORDER BY decade",
    ),
    (
        "HbA1c results by age cohort (CASE buckets with literal labels)",
        "SELECT CASE WHEN p.birth_year < 1960 THEN 'born before 1960' WHEN p.birth_year < 1980 THEN '1960 to 1979' \
         ELSE '1980 or later' END AS cohort, COUNT(*) AS results, COUNT(DISTINCT l.pid) AS patients \
         FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' GROUP BY 1 ORDER BY cohort",
    ),
    (
        "Diabetes (E11) but never hypertension (I10), by sex: a cohort of IN / NOT IN subqueries. \
         Each hospital decides membership from its own rows, so a patient with I10 recorded at \
         another hospital still counts here: the exact answer below decides it over all hospitals",
        "SELECT sex, COUNT(*) AS patients FROM participants \
         WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') \
         AND pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10') GROUP BY sex ORDER BY sex",
    ),
    (
        "E11 per 1,000 participants: the scalar subquery (the denominator) is one more statistic \
         of the same query, and the ratio is computed from the two noisy counts",
        "SELECT COUNT(*) * 1000.0 / (SELECT COUNT(*) FROM participants) AS e11_per_1000 \
         FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')",
    ),
    (
        "Latest HbA1c per patient, by category: ROW_NUMBER() per participant kept at 1 \
         (a participant treated at two hospitals has a latest result at each)",
        "WITH latest AS (SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY measured_on DESC) AS rn \
         FROM labs WHERE test = 'HbA1c') \
         SELECT CASE WHEN value >= 6.5 THEN '6.5% or more' ELSE 'under 6.5%' END AS latest_hba1c, COUNT(*) AS patients \
         FROM latest WHERE rn = 1 GROUP BY 1 ORDER BY 1",
    ),
    (
        "Mean age in 2026 and the share born before 1960, by sex: aggregates of expressions, \
         bounded by interval arithmetic over birth_year's bounds",
        "SELECT sex, AVG(2026 - birth_year) AS mean_age, \
         AVG(CASE WHEN birth_year < 1960 THEN 1.0 ELSE 0 END) AS share_before_1960 \
         FROM participants GROUP BY sex ORDER BY sex",
    ),
    (
        "Stored serum and plasma volume",
        "SELECT kind, SUM(volume_ml) AS total_ml FROM specimens WHERE status = 'stored' AND kind IN ('serum', 'plasma') GROUP BY kind ORDER BY kind",
    ),
    (
        "How many diagnosis rows are type 2 diabetes (E11)?",
        "SELECT COUNT(*) AS e11_rows FROM diagnoses WHERE code = 'E11'",
    ),
    (
        "Which diagnosis codes are most common among BRCA2 carriers? (codes have no public list: \
         only codes with enough participants pass DP partition selection, which costs δ)",
        "SELECT code, COUNT(*) AS n FROM diagnoses JOIN variants USING (pid) WHERE gene = 'BRCA2' \
         GROUP BY code ORDER BY n DESC LIMIT 10",
    ),
];

/// Queries fedq refuses, shown in the demo.
pub const DEMO_REFUSED: &[&str] = &[
    "SELECT * FROM labs",
    "SELECT pid, COUNT(*) FROM diagnoses GROUP BY pid",
    "SELECT MAX(value) FROM labs",
];

/// Run the demo.
pub async fn run(cfg: DemoConfig) -> Result<(), CliError> {
    let tmp;
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("fedq-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "Generating a synthetic federation: {} sites, {} participants (seed {}) in {}",
        cfg.sites,
        cfg.participants,
        cfg.seed,
        dir.display()
    );
    let t = std::time::Instant::now();
    fedq_synth::generate(&fedq_synth::SynthConfig {
        sites: cfg.sites,
        participants: cfg.participants,
        seed: cfg.seed,
        out_dir: dir.clone(),
        base_port: 31050,
    })?;
    println!("  done in {:.1} s", t.elapsed().as_secs_f64());
    if cfg.researcher_tls {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("coordinator.toml"))?;
        writeln!(
            f,
            "\n[researcher_tls]\ncert = \"certs/coordinator.pem\"\nkey = \"certs/coordinator.key\""
        )?;
    }
    let opts = FederationOptions {
        coordinator_listen: if cfg.serve {
            cfg.listen
        } else {
            FederationOptions::default().coordinator_listen
        },
        ..Default::default()
    };
    let fed = LocalFederation::start(&dir, opts).await?;
    println!(
        "Started {} nodes and a coordinator on {} (loopback only)\n",
        fed.nodes.len(),
        fed.url()
    );
    let mut client = fed.client("alice").await?;
    let exact = union_context(&dir).await?;

    for (title, sql) in DEMO_QUERIES {
        println!("== {title}\n   {sql}\n");
        let r = client.query(sql).await?;
        println!("fedq answer (differentially private, researcher alice):");
        println!("{}", render(&r.schema, &r.batches)?);
        let ex = exact.sql(sql).await?.collect().await?;
        println!("EXACT answer — demo only, computed directly from the synthetic files; never available to researchers:");
        println!("{}", pretty_format_batches(&ex)?);
        if sql.contains("FROM labs") {
            println!(
                "Note: beyond noise, fedq's answer differs because each participant contributes at most \
                 R = 20 lab rows per site (heavy users are sampled down), and values are clamped into \
                 [0, 500], so sentinel codes such as 9999 count as 500."
            );
        }
        println!();
    }

    println!("== Before spending: EXPLAIN shows the cost and expected accuracy, free of charge");
    let explain = "SELECT sex, AVG(birth_year) AS mean_by, STDDEV(birth_year) AS sd FROM participants GROUP BY sex";
    println!("   EXPLAIN {explain}\n");
    let r = client.query(&format!("EXPLAIN {explain}")).await?;
    println!("{}", render(&r.schema, &r.batches)?);

    println!("== A smaller ε buys less accuracy: SET fedq.epsilon = 0.2");
    client.query("SET fedq.epsilon = 0.2").await?;
    let r = client.query(DEMO_QUERIES[0].1).await?;
    println!("{}", render(&r.schema, &r.batches)?);
    client.query("RESET fedq.epsilon").await?;

    println!("== Queries fedq refuses, and why");
    for sql in DEMO_REFUSED {
        match client.query(sql).await {
            Err(CliError::Server { code, message }) => {
                println!("   {sql}\n   -> refused ({code:?}): {message}\n")
            }
            Err(e) => println!("   {sql}\n   -> error: {e}\n"),
            Ok(_) => println!("   {sql}\n   -> unexpectedly answered\n"),
        }
    }

    if cfg.serve {
        let password_file = dir.join("researchers").join("alice.password");
        println!("The federation keeps running. Connect with:\n");
        println!(
            "  fedq sql --url {}{} --user alice --password-file {}\n",
            fed.url(),
            if fed.researcher_tls {
                format!(" --ca {}", dir.join("certs").join("ca.pem").display())
            } else {
                String::new()
            },
            password_file.display()
        );
        println!("or from Python (pip install adbc-driver-flightsql pyarrow):\n");
        println!("  import adbc_driver_flightsql.dbapi as flightsql");
        println!(
            "  password = open({:?}).read().strip()",
            password_file.display().to_string()
        );
        println!(
            "  conn = flightsql.connect({:?}, db_kwargs={{\"username\": \"alice\", \"password\": password}})",
            format!("grpc://{}", fed.coordinator.addr)
        );
        println!("  cur = conn.cursor(); cur.execute(\"SELECT sex, COUNT(*) FROM participants GROUP BY sex\"); print(cur.fetch_arrow_table())\n");
        if let Some(m) = fed.coordinator.metrics_addr {
            println!("Prometheus metrics: coordinator http://{m}/metrics");
        }
        for (site, n) in fed.sites.iter().zip(&fed.nodes) {
            if let Some(m) = n.metrics_addr {
                println!("                    {site} http://{m}/metrics");
            }
        }
        println!("\nPress Ctrl-C to stop.");
        if let Some(p) = &cfg.ready_file {
            let v = serde_json::json!({
                "url": fed.url(),
                "grpc": if fed.researcher_tls {
                    format!("grpc+tls://{}", fed.coordinator.addr)
                } else {
                    format!("grpc://{}", fed.coordinator.addr)
                },
                "ca": dir.join("certs").join("ca.pem"),
                "user": "alice",
                "password": fed.password("alice")?,
                "bob_password": fed.password("bob").unwrap_or_default(),
                "officer": "olivia",
                "officer_password": fed.password("olivia").unwrap_or_default(),
                "dir": dir,
            });
            std::fs::write(p, v.to_string())?;
        }
        tokio::signal::ctrl_c().await?;
        println!("Stopping.");
    }
    fed.shutdown().await?;
    Ok(())
}

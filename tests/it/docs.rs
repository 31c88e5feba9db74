//! Keeps the documentation and deployment files in step with the code: docs/contract.md names
//! every queue, routing key, command, error code, outcome and configuration key; the compose
//! file only sets keys that exist; README, Dockerfile and CI agree on the commands. No services
//! needed.

use std::collections::BTreeSet;
use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `section.key` of config/default.toml.
fn default_keys() -> BTreeSet<String> {
    let doc: toml::Table = toml::from_str(&read("config/default.toml")).expect("default.toml");
    let mut keys = BTreeSet::new();
    for (section, value) in &doc {
        let table = value
            .as_table()
            .unwrap_or_else(|| panic!("default.toml: `{section}` is not a section"));
        for key in table.keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

fn compose() -> serde_yaml::Value {
    serde_yaml::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML")
}

/// A service's environment as (name, value) pairs; compose allows a map or a list.
fn environment(service: &serde_yaml::Value) -> Vec<(String, String)> {
    let text = |v: &serde_yaml::Value| match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        _ => String::new(),
    };
    match service.get("environment") {
        Some(serde_yaml::Value::Mapping(m)) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let s = text(item);
                match s.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (s, String::new()),
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_has_the_three_services() {
    let doc = compose();
    let services = doc.get("services").expect("services");
    for name in ["postgres", "rabbitmq", "worker"] {
        assert!(services.get(name).is_some(), "service `{name}` missing");
    }
    let worker = &services["worker"];
    assert!(
        worker.get("build").is_some(),
        "the worker is built from the Dockerfile"
    );
    for dep in ["postgres", "rabbitmq"] {
        let condition = worker["depends_on"][dep]["condition"].as_str();
        assert_eq!(
            condition,
            Some("service_healthy"),
            "worker depends_on {dep}"
        );
        assert!(
            services[dep].get("healthcheck").is_some(),
            "{dep} needs a healthcheck for service_healthy"
        );
    }
    let env = environment(worker);
    for var in ["DATABASE_URL", "AMQP_URL", "CREDIT_WORKER__HTTP__LISTEN"] {
        assert!(env.iter().any(|(k, _)| k == var), "worker sets {var}");
    }
}

#[test]
fn compose_sets_only_existing_config_keys() {
    let keys = default_keys();
    let doc = compose();
    let services = doc["services"].as_mapping().expect("services map");
    let mut checked = 0;
    for (name, service) in services {
        for (var, _) in environment(service) {
            let Some(rest) = var.strip_prefix("CREDIT_WORKER__") else {
                continue;
            };
            let key = rest.replace("__", ".").to_lowercase();
            assert!(
                keys.contains(&key),
                "{name:?}: {var} names `{key}`, which is not in config/default.toml"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "the compose file configures the worker by environment"
    );
}

#[test]
fn dockerfile_and_readme_agree() {
    let dockerfile = read("Dockerfile");
    let readme = read("README.md");
    let build = "cargo build --release --locked";
    assert!(dockerfile.contains(build), "Dockerfile runs `{build}`");
    assert!(
        readme.contains(build),
        "README names the image's build command"
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["credit-worker"]"#));
    assert!(dockerfile.contains(r#"CMD ["run"]"#));
    assert!(dockerfile.contains("EXPOSE 9464"));
    assert!(dockerfile.contains("CREDIT_WORKER__HTTP__LISTEN=0.0.0.0:9464"));
    // `run` is the subcommand the image starts and the README's quick start runs.
    assert!(readme.contains("cargo run --release -- run"));
    assert!(readme.contains("docker compose up"));
    // The Dockerfile's env key is a real key too.
    assert!(default_keys().contains("http.listen"));
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = read("README.md");
    let command = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo test"))
        .and_then(|l| l.split('#').next())
        .map(str::trim)
        .expect("README names a cargo test command");
    assert_eq!(command, "cargo test");
    let ci = read(".ci/run");
    assert!(
        ci.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .any(|l| l == command),
        ".ci/run runs `{command}`"
    );
}

/// `backtick`-quoted words of a text.
fn quoted(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn contract_names_every_interface_element() {
    use credit_worker::amqp::topology;
    use credit_worker::events;
    let contract = read("docs/contract.md");
    let names = quoted(&contract);
    let mut missing = Vec::new();
    let mut require = |what: &str, item: &str| {
        if !names.contains(item) {
            missing.push(format!("{what} `{item}`"));
        }
    };
    for q in [
        topology::INPUT,
        topology::INPUT_ROUTING_KEY,
        topology::DLX,
        topology::DEAD,
        topology::EVENTS,
        topology::CONTROL,
        topology::LEDGER,
    ] {
        require("queue/exchange", q);
    }
    for rk in [
        events::BALANCE_CHANGED,
        events::CHARGE_REJECTED,
        events::BALANCE_LOW,
    ] {
        require("routing key", rk);
    }
    for c in credit_worker::control::COMMANDS {
        require("control command", c);
    }
    for code in [
        "bad_request",
        "forbidden",
        "amount_out_of_range",
        "not_found",
        "internal",
    ] {
        require("error code", code);
    }
    for o in ["charged", "free", "rejected", "invalid"] {
        require("outcome", o);
    }
    for key in default_keys() {
        require("config key", &key);
    }
    for tx_key in [
        "USAGE-{node_exec_id}",
        "EXECUTION-FEE-{user}-{YYYY-MM-DD}-{n}",
        "MONTHLY-CREDIT-TOP-UP-{YYYY-MM}",
        "balance.changed:{user}:{transaction_key}",
        "charge.rejected:{node_exec_id}",
        "balance.low:{user}:{seq}",
        "x-credit-error",
    ] {
        require("key format", tx_key);
    }
    assert!(
        missing.is_empty(),
        "docs/contract.md lacks: {}",
        missing.join(", ")
    );
}

/// The keys in the first column of the markdown table under `heading`.
fn table_keys(doc: &str, heading: &str) -> Vec<String> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("heading `{heading}` missing"));
    let section = &doc[start + heading.len()..];
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn contract_configuration_table_lists_exactly_the_keys() {
    let contract = read("docs/contract.md");
    let keys = default_keys();
    let listed = table_keys(&contract, "## 8. Configuration");
    for key in &listed {
        assert!(
            keys.contains(key),
            "docs/contract.md lists `{key}`, which is not in config/default.toml"
        );
    }
    let listed: BTreeSet<String> = listed.into_iter().collect();
    let unlisted: Vec<_> = keys.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "docs/contract.md's table lacks {unlisted:?}"
    );
}

#[test]
fn readme_configuration_table_lists_exactly_the_keys() {
    let readme = read("README.md");
    let keys = default_keys();
    let listed: BTreeSet<String> = table_keys(&readme, "## Configuration")
        .into_iter()
        .collect();
    assert_eq!(
        listed, keys,
        "README's configuration table vs config/default.toml"
    );
}

#[test]
fn readme_links_the_documents() {
    let readme = read("README.md");
    for doc in [
        "docs/contract.md",
        "docs/benchmarks.md",
        "docs/reliability.md",
    ] {
        assert!(readme.contains(doc), "README links {doc}");
    }
    assert!(readme.contains("RUSTSEC-2025-0012"));
}

#[test]
fn history_flags_are_documented() {
    // The flags as the binary knows them, so a new one cannot go undocumented.
    let out = std::process::Command::new(crate::helpers::binary())
        .args(["history", "--help"])
        .output()
        .expect("credit-worker history --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .filter(|w| !["--help", "--json", "--config"].contains(w))
        .collect();
    for flag in ["--limit", "--before-seq", "--type", "--graph-exec-id"] {
        assert!(
            flags.contains(flag),
            "`history --help` lacks {flag}:\n{help}"
        );
    }
    let readme = read("README.md");
    let contract = read("docs/contract.md");
    for flag in &flags {
        assert!(readme.contains(flag), "README lacks `history {flag}`");
        assert!(
            contract.contains(flag),
            "docs/contract.md lacks `history {flag}`"
        );
    }
    for field in ["before_seq", "type", "graph_exec_id", "next_before_seq"] {
        assert!(quoted(&readme).contains(field), "README lacks `{field}`");
        assert!(
            quoted(&contract).contains(field),
            "docs/contract.md lacks `{field}`"
        );
    }
}

//! The workspace's layers, checked on its sources: the module graph of every crate
//! has no cycle, the production proxy does not link the mock, general helpers live
//! outside the core, and `unsafe` stays in the one crate that needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's crates, as its `Cargo.toml` lists them: a crate added later
/// is checked without anyone remembering to name it here.
fn crates() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    let members = manifest["workspace"]["members"].as_array().expect("workspace members");
    let crates: Vec<String> = members.iter().map(|m| m.as_str().unwrap().to_owned()).collect();
    assert!(crates.len() >= 12 && crates.iter().any(|c| c == "gateway-core"), "{crates:?}");
    crates
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = Vec::new();
    for path in entries.map(|e| e.unwrap().path()) {
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The top-level module a source file of `src/` belongs to (`lib` or `main` for
/// the crate root).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules `text` names through `crate::`, in paths and in
/// `use crate::{a, b::c}` groups.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for rest in text.split("crate::").skip(1) {
        if let Some(group) = rest.strip_prefix('{') {
            names.extend(group_heads(group));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// The first segment of each path in a `{...}` group (up to its closing brace).
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut heads, mut at_start) = (0, Vec::new(), true);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_start = true,
            c if at_start && !c.is_whitespace() => {
                heads.push(ident(&group[i..]));
                at_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Which module of the crate imports which: module -> modules it names.
fn module_graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join(krate).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let module = module_of(&src, &file);
        let text = code_lines(&std::fs::read_to_string(&file).unwrap());
        let imports: Vec<String> = crate_imports(&text).into_iter().filter(|m| *m != module).collect();
        graph.entry(module).or_default().extend(imports);
    }
    // A name that is no module's is an item of the crate root.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    let root = modules.iter().find(|m| *m == "lib" || *m == "main").cloned().unwrap_or_default();
    for imports in graph.values_mut() {
        *imports = imports.iter().map(|m| if modules.contains(m) { m.clone() } else { root.clone() }).collect();
    }
    graph.iter_mut().for_each(|(module, imports)| {
        imports.remove(module);
    });
    graph
}

/// The lines of `text` that are not comments (doc links name modules without
/// importing them).
fn code_lines(text: &str) -> String {
    let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
    code.collect::<Vec<_>>().join("\n")
}

/// A cycle in `graph`, if it has one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            return Some(path[start..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_import_parser_reads_paths_and_groups() {
    let text = "use crate::store::Store;\nuse crate::{delta::{Change, CounterDelta}, key, time::Nanos};\nx = crate::reason::Reason::Ok;";
    let expected: BTreeSet<String> = ["store", "delta", "key", "time", "reason"].map(String::from).into();
    assert_eq!(crate_imports(text), expected);
    let cyclic: BTreeMap<String, BTreeSet<String>> =
        [("a", "b"), ("b", "c"), ("c", "a")].map(|(m, n)| (m.to_owned(), BTreeSet::from([n.to_owned()]))).into();
    assert_eq!(find_cycle(&cyclic).map(|c| c.len()), Some(3));
}

#[test]
fn no_modules_of_a_crate_import_each_other() {
    for krate in crates() {
        let krate = krate.as_str();
        let graph = module_graph(krate);
        assert!(!graph.is_empty() || krate == "benches", "{krate} has no sources");
        let cycle = find_cycle(&graph);
        assert_eq!(cycle, None, "modules of {krate} import each other");
    }
}

/// The names in a `[section]` of a Cargo.toml.
fn dependencies(krate: &str, section: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    manifest.get(section).and_then(|d| d.as_table()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn the_proxy_and_the_mock_share_the_tokenizer_and_the_proxy_does_not_link_the_mock() {
    let proxy = dependencies("proxy", "dependencies");
    assert!(proxy.contains("tokenizer"), "{proxy:?}");
    assert!(!proxy.contains("mock-aoai"), "the production proxy links the mock: {proxy:?}");
    assert!(dependencies("mock-aoai", "dependencies").contains("tokenizer"));
}

#[test]
fn the_redis_harness_is_linked_by_tests_alone() {
    let linked: Vec<String> =
        crates().into_iter().filter(|k| dependencies(k, "dependencies").contains("redis-harness")).collect();
    assert!(linked.is_empty(), "redis-harness is a dependency of {linked:?}, not only of their tests");
    assert!(dependencies("proxy", "dev-dependencies").contains("redis-harness"));
}

#[test]
fn the_core_hosts_no_general_helpers_and_depends_on_no_driver() {
    let core = dependencies("gateway-core", "dependencies");
    for driver in ["simulator", "proxy", "mock-aoai", "tokio", "hyper", "axum"] {
        assert!(!core.contains(driver), "gateway-core depends on {driver}");
    }
    let helpers = ["fn edit_distance", "fn describe_toml_error", "fn line_column", "fn suggestion"];
    for file in rust_files(&root().join("gateway-core/src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for helper in helpers {
            assert!(!text.contains(helper), "{} defines `{helper}`: it belongs to diagnostics", file.display());
        }
    }
}

#[test]
fn unsafe_code_lives_only_in_the_cache_hint_crate() {
    let mut found = Vec::new();
    for krate in crates().iter().filter(|k| *k != "cache-hint") {
        for dir in ["src", "tests", "benches"] {
            // This file names the keyword in its own patterns.
            let others = rust_files(&root().join(krate).join(dir)).into_iter().filter(|f| !f.ends_with(file!()));
            for file in others {
                let code = code_lines(&std::fs::read_to_string(&file).unwrap());
                if code.contains("unsafe ") || code.contains("unsafe{") {
                    found.push(file.display().to_string());
                }
            }
        }
    }
    assert!(found.is_empty(), "unsafe outside cache-hint: {found:?}");
}

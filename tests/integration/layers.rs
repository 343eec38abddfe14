//! The layer rule of ARCHITECTURE.md: every module of `src/` uses only modules of a lower layer. The
//! table is read from ARCHITECTURE.md itself, so the document and the code cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `module → layer`, from the `## Layers` table: rows like ``| 4 | `error`, `snapshot` | ... |``.
fn layer_table(architecture: &str) -> BTreeMap<String, u32> {
    let section = architecture.split("\n## Layers").nth(1).expect("ARCHITECTURE.md has a ## Layers section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut table = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(layer), Some(modules)) = (cells.get(1), cells.get(2)) else { continue };
        let Ok(layer) = layer.parse::<u32>() else { continue }; // the header and separator rows
        for module in modules.split(',') {
            let name = module.trim().trim_matches('`');
            assert!(table.insert(name.to_owned(), layer).is_none(), "{name} is listed twice in the layer table");
        }
    }
    table
}

/// The top-level module a source file belongs to: `src/token/cache/mod.rs` → `token`; `None` for the
/// crate root files, which may use everything.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// The modules named by `crate::` paths in code (comments are skipped), including `crate::{a, b}`.
fn crate_uses(text: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            // `$crate::` in macros and `tokend_crate::`-like identifiers are not crate paths.
            if line[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            match rest.strip_prefix('{') {
                Some(group) => {
                    let group = group.split('}').next().unwrap_or(group);
                    out.extend(group.split(',').map(|p| ident(p.trim())).filter(|m| !m.is_empty()));
                }
                None => out.push(ident(rest)),
            }
        }
    }
    out
}

/// Every use of a module that is not strictly lower, as `file: module (layer) uses other (layer)`.
fn violations(table: &BTreeMap<String, u32>, files: &[(String, String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, module, text) in files {
        let Some(&own) = table.get(module) else {
            out.push(format!("{path}: module `{module}` is not in the layer table of ARCHITECTURE.md"));
            continue;
        };
        for used in crate_uses(text).into_iter().filter(|u| u != module) {
            match table.get(&used) {
                Some(&layer) if layer < own => {}
                Some(&layer) => out.push(format!(
                    "{path}: `{module}` (layer {own}) uses `{used}` (layer {layer}); a module may only use lower layers"
                )),
                None => out.push(format!("{path}: uses `crate::{used}`, which is not in the layer table")),
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_only_use_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = layer_table(&std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md"));
    assert!(table.len() >= 10, "the layer table looks unparsed: {table:?}");
    let src = root.join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let mut files = Vec::new();
    for path in paths {
        if let Some(module) = module_of(&src, &path) {
            let text = std::fs::read_to_string(&path).expect("read");
            files.push((path.strip_prefix(root).expect("in repo").display().to_string(), module, text));
        }
    }
    let found: std::collections::BTreeSet<&str> = files.iter().map(|(_, m, _)| m.as_str()).collect();
    for listed in table.keys() {
        assert!(found.contains(listed.as_str()), "ARCHITECTURE.md lists `{listed}`, which is not a module of src/");
    }
    let v = violations(&table, &files);
    assert!(v.is_empty(), "layer violations:\n{}", v.join("\n"));
}

#[test]
fn the_check_catches_upward_and_sideways_uses() {
    let table = layer_table(
        "# A\n\n## Layers\n| layer | modules |\n|---|---|\n| 0 | `net` |\n| 1 | `token`, `config` |\n| 2 | `server` |\n\n## Next\n| 9 | `ignored` |\n",
    );
    assert_eq!(table.len(), 4, "{table:?}");
    let file = |module: &str, text: &str| (format!("src/{module}.rs"), module.to_owned(), text.to_owned());
    let files = [
        file("token", "use crate::net::x;\n// crate::server in a comment\nfn f() { crate::token::g() }"),
        file("server", "use crate::{token::A, net};"),
        file("net", "    let _ = crate::server::router();"),
        file("config", "use crate::{net::X, token::Y};"),
        file("unlisted", "fn f() {}"),
    ];
    let v = violations(&table, &files);
    assert_eq!(v.len(), 3, "{v:#?}");
    assert!(v[0].contains("`net` (layer 0) uses `server` (layer 2)"), "{v:#?}");
    assert!(v[1].contains("`config` (layer 1) uses `token` (layer 1)"), "{v:#?}");
    assert!(v[2].contains("`unlisted` is not in the layer table"), "{v:#?}");
}

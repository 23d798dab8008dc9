//! Keeps the crate's layers one-way: reads every `crate::…` and `super::…` path in `src/` and
//! fails when two files import each other through any chain (a parent module naming its own
//! children excepted), or when a layer imports from a layer above it in the map of `src/lib.rs`,
//! or when an outside crate that belongs to one layer (hyper, redis) is named elsewhere.
//!
//! Test-only code (`#[cfg(test)]` items) and comments are not imports and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module's path from the crate root (`[]` is `lib.rs`).
type ModPath = Vec<String>;

struct Source {
    module: ModPath,
    file: String,
    code: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files
        .into_iter()
        .filter(|path| !path.ends_with("main.rs"))
        .map(|path| {
            let relative = path.strip_prefix(&root).unwrap();
            let mut module: ModPath = relative
                .with_extension("")
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let text = fs::read_to_string(&path).unwrap();
            Source {
                module,
                file: format!("src/{}", relative.display()),
                code: without_tests(&strip_comments_and_strings(&text)),
            }
        })
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The code with comments blanked and string and char literals emptied.
fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let end = text[open + 1..]
                    .find(&close)
                    .map_or(b.len(), |at| open + 1 + at + close.len());
                out.push_str("\"\"");
                i = end;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A char literal ('x', '\n', '"'); a lifetime ('a) has no closing quote.
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => {
                i += 3;
                out.push_str("' '");
            }
            c => {
                // Whole UTF-8 sequences: `i` only ever stops on ASCII bytes.
                let len = text[i..].chars().next().unwrap().len_utf8();
                if c.is_ascii() {
                    out.push(c as char);
                } else {
                    out.push_str(&text[i..i + len]);
                }
                i += len;
            }
        }
    }
    out
}

/// The code without `#[cfg(test)]` items: tests may reach anywhere.
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        rest = &rest[at + "#[cfg(test)]".len()..];
        let brace = rest.find('{');
        let semi = rest.find(';');
        rest = match (brace, semi) {
            (Some(b), Some(s)) if s < b => &rest[s + 1..],
            (Some(b), _) => &rest[matching_brace(rest, b) + 1..],
            (None, Some(s)) => &rest[s + 1..],
            (None, None) => "",
        };
    }
    out.push_str(rest);
    out
}

fn matching_brace(code: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    code.len() - 1
}

/// Every path named after `crate::` or `super::` in `code` (use trees expanded), from the crate
/// root.
fn named_paths(code: &str, module: &ModPath) -> Vec<ModPath> {
    let chars: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        let word = ident_at(&chars, i);
        if boundary && (word == "crate" || word == "super") && at(&chars, i + word.len(), "::") {
            let mut base: ModPath = if word == "crate" {
                Vec::new()
            } else {
                parent(module)
            };
            let mut j = i + word.len() + 2;
            // `super::super::…`
            while ident_at(&chars, j) == "super" && at(&chars, j + 5, "::") {
                base = parent(&base);
                j += 7;
            }
            let (paths, end) = use_tree(&chars, j, base);
            found.extend(paths);
            i = end.max(i + 1);
        } else {
            i += word.len().max(1);
        }
    }
    found
}

fn parent(module: &ModPath) -> ModPath {
    module[..module.len().saturating_sub(1)].to_vec()
}

fn at(chars: &[char], i: usize, s: &str) -> bool {
    s.chars()
        .enumerate()
        .all(|(k, c)| chars.get(i + k) == Some(&c))
}

fn ident_at(chars: &[char], i: usize) -> String {
    chars[i..]
        .iter()
        .take_while(|c| c.is_alphanumeric() || **c == '_')
        .collect()
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

/// Parses a use tree (or an expression path) at `i` under `prefix`; returns the full paths it
/// names and where it ends.
fn use_tree(chars: &[char], mut i: usize, mut prefix: ModPath) -> (Vec<ModPath>, usize) {
    loop {
        i = skip_space(chars, i);
        if chars.get(i) == Some(&'{') {
            let mut paths = Vec::new();
            i += 1;
            loop {
                i = skip_space(chars, i);
                match chars.get(i) {
                    Some('}') | None => return (paths, i + 1),
                    Some(',') => i += 1,
                    _ => {
                        let (inner, end) = use_tree(chars, i, prefix.clone());
                        paths.extend(inner);
                        i = end;
                    }
                }
            }
        }
        let word = ident_at(chars, i);
        if word.is_empty() {
            // `*`, or the end of the path.
            return (vec![prefix], i + usize::from(chars.get(i) == Some(&'*')));
        }
        i += word.len();
        if word != "self" {
            prefix.push(word);
        }
        let after = skip_space(chars, i);
        if at(chars, after, "::") {
            i = after + 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The file a path from the root lands in: the longest prefix that is a module of a file.
fn resolve<'a>(path: &ModPath, modules: &'a BTreeMap<ModPath, String>) -> &'a str {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()))
        .map(String::as_str)
        .expect("the root is a module")
}

/// Each file's imports of other files (a parent naming its own children excepted).
fn import_graph() -> (Vec<Source>, BTreeMap<String, BTreeSet<String>>) {
    let sources = sources();
    let modules: BTreeMap<ModPath, String> = sources
        .iter()
        .map(|s| (s.module.clone(), s.file.clone()))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in &sources {
        let edges = graph.entry(source.file.clone()).or_default();
        for path in named_paths(&source.code, &source.module) {
            let target = resolve(&path, &modules);
            let target_module = modules.iter().find(|(_, f)| *f == target).unwrap().0;
            let is_own_child = target_module.starts_with(&source.module);
            if !is_own_child {
                edges.insert(target.to_owned());
            }
        }
    }
    (sources, graph)
}

/// Strongly connected components of more than one file (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.found
}

#[test]
fn no_two_files_of_src_import_each_other() {
    let (_, graph) = import_graph();
    let loops = cycles(&graph);
    let described: Vec<String> = loops
        .iter()
        .map(|files| {
            let inside: BTreeSet<&String> = files.iter().collect();
            let edges: Vec<String> = files
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| inside.contains(to))
                        .map(move |to| format!("  {from} -> {to}"))
                })
                .collect();
            format!("a loop of {} files:\n{}", files.len(), edges.join("\n"))
        })
        .collect();
    assert!(loops.is_empty(), "{}", described.join("\n\n"));
}

/// The layer map in `src/lib.rs`: lines `//! N. <name>: \`module\`, \`module\`…` from the bottom
/// layer (1) up. A module not listed belongs to the layer of its nearest listed ancestor.
fn layer_map() -> Vec<(usize, String, ModPath)> {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let mut map = Vec::new();
    let mut in_map = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if doc.starts_with("# Layers") {
            in_map = true;
            continue;
        }
        if in_map && doc.starts_with('#') {
            break;
        }
        let Some((number, rest)) = doc.split_once(". ") else {
            continue;
        };
        let (Ok(layer), true) = (number.parse::<usize>(), in_map) else {
            continue;
        };
        let (name, modules) = rest.split_once(':').expect("`N. name: `modules`…`");
        for module in modules.split('`').skip(1).step_by(2) {
            let path = module
                .trim_start_matches("crate::")
                .split("::")
                .map(str::to_owned)
                .collect();
            map.push((layer, name.trim().to_owned(), path));
        }
    }
    map
}

fn layer_of<'m>(
    module: &ModPath,
    map: &'m [(usize, String, ModPath)],
) -> Option<&'m (usize, String, ModPath)> {
    map.iter()
        .filter(|(_, _, path)| module.starts_with(path))
        .max_by_key(|(_, _, path)| path.len())
}

#[test]
fn every_layer_imports_only_from_below_it_as_the_map_in_lib_rs_says() {
    let map = layer_map();
    assert!(map.len() >= 8, "src/lib.rs has a `# Layers` map");
    let (sources, graph) = import_graph();
    let module_of: BTreeMap<&str, &ModPath> = sources
        .iter()
        .map(|s| (s.file.as_str(), &s.module))
        .collect();
    let mut wrong = Vec::new();
    for source in &sources {
        if source.module.is_empty() {
            continue;
        }
        let Some(from) = layer_of(&source.module, &map) else {
            wrong.push(format!("{} is in no layer of the map", source.file));
            continue;
        };
        for target in &graph[&source.file] {
            let to_module = module_of[target.as_str()];
            if to_module.is_empty() {
                continue;
            }
            let Some(to) = layer_of(to_module, &map) else {
                continue;
            };
            if to.0 > from.0 {
                wrong.push(format!(
                    "{} ({}) imports {} ({}), a layer above it",
                    source.file, from.1, target, to.1
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Whether `code` names the outside crate `krate`: `redis::…` or `::redis::…`, not
/// `broker::redis::…` (a module of this crate) nor `my_redis::…`.
fn names_crate(code: &str, krate: &str) -> bool {
    code.match_indices(krate).any(|(at, _)| {
        let after = &code[at + krate.len()..];
        let before = code[..at].strip_suffix("::").unwrap_or(&code[..at]);
        let joined = before
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        after.starts_with("::") && !joined
    })
}

#[test]
fn hyper_and_redis_are_named_only_in_their_layers() {
    // Each crate, and the module folders where it may be named.
    let confined: [(&str, &[&str]); 2] = [
        ("hyper", &["http", "backend", "process"]),
        ("redis", &["broker"]),
    ];
    let mut wrong = Vec::new();
    for source in sources() {
        for (krate, allowed) in confined {
            let allowed = allowed
                .iter()
                .any(|m| source.module.first().is_some_and(|first| first == m));
            if names_crate(&source.code, krate) && !allowed {
                wrong.push(format!("{} names the `{krate}` crate", source.file));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_reader_follows_use_trees_and_skips_comments_strings_and_tests() {
    let code = strip_comments_and_strings(
        "use crate::{a::{b, c::D}, e};\n// use crate::x;\nlet s = \"crate::y\";\n\
         fn f() { super::g::h(); }\n#[cfg(test)]\nmod tests { use crate::z; }\n",
    );
    let code = without_tests(&code);
    let paths = named_paths(&code, &vec!["m".into(), "n".into()]);
    let names: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(names, ["a::b", "a::c::D", "e", "m::g::h"]);
}

#[test]
fn an_outside_crate_is_found_however_its_path_starts() {
    assert!(names_crate("let c = redis::cmd(\"GET\");", "redis"));
    assert!(names_crate("use ::redis::aio::Conn;", "redis"));
    assert!(names_crate("fn f(r: &hyper::Request<()>) {}", "hyper"));
    assert!(!names_crate(
        "use crate::broker::redis::RedisBroker;",
        "redis"
    ));
    assert!(!names_crate("let my_redis = 1; my_redis::x();", "redis"));
    assert!(!names_crate("// no path: redis", "redis"));
}

//! The crate's module graph, read from its own source: each layer imports
//! only from the layers below it, no module outside the listed knots is in
//! an import cycle, and the module graph printed in DESIGN.md §11 is the one
//! the code has.
//!
//! A reference is any `crate::…` or `super::…` path, or a `use` of a child
//! module, outside comments; it is attributed to the module that *defines*
//! the item (re-exports are followed), so a parent that only declares and
//! re-exports its children does not depend on them. Run with
//! `BLESS_MODULE_GRAPH=1` to rewrite the block in DESIGN.md after a change
//! to the module tree, and with `MODULE_GRAPH_DUMP=1` to print every
//! module's imports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level modules, bottom to top. A module may import only from layers
/// with a smaller number, or from inside itself.
const LAYERS: &[(&str, u32, &str)] = &[
    (
        "types",
        0,
        "the vocabulary: errors, roles, permissions, block status, query results, I/O vectors and owned buffers",
    ),
    ("sync", 1, "the graph lock"),
    (
        "nbd",
        1,
        "the NBD wire protocol, shared by the export and the nbd driver",
    ),
    (
        "thread",
        1,
        "what runs on this thread: role, lent Bql, polled task",
    ),
    (
        "graph",
        2,
        "the graph: state, proofs, driver interface, runtimes, changes, drain",
    ),
    ("backend", 3, "the request path: BlockBackend"),
    ("driver", 4, "the driver kit"),
    ("drivers", 5, "the built-in drivers"),
    (
        "snapshot",
        6,
        "live external snapshots: overlays created, appended and the old tops made read-only in one transaction",
    ),
    (
        "job",
        6,
        "block jobs: the job model, the copy engine, stream, commit",
    ),
    ("export", 7, "exports: NBD"),
];

/// Import cycles between files that are in the design, each with its
/// reason. Any other cycle fails the test; so does a knot listed here that
/// the code no longer has (update the list and DESIGN.md §11 together).
const KNOTS: &[(&[&str], &str)] = &[
    (
        &[
            "graph",
            "graph::backend",
            "graph::callbacks",
            "graph::drain",
            "graph::driver",
            "graph::edge",
            "graph::node",
            "graph::permission",
            "graph::proof::bql",
            "graph::proof::drained",
            "graph::proof::graph_writer",
            "graph::proof::node_handle",
            "graph::proof::node_ref",
            "graph::proof::read_guard",
            "graph::proof::view",
            "graph::dot",
            "graph::query",
            "graph::runtime::io_task",
            "graph::runtime::io_thread",
            "graph::runtime::main_loop",
            "graph::runtime::main_task",
        ],
        "the graph's types refer to each other by nature: a node owns its driver \
     (`Box<dyn BlockDriver>`), the driver's callbacks receive proofs that point \
     at nodes, a node's edges point at nodes, and each context that lends a \
     proof (MainLoop -> Bql, IoTask -> ReadGuard, Bql -> Drained/GraphWriter) \
     is named by the proof it lends",
    ),
    // qcow2's files were a knot until they were split by layer (see
    // src/drivers/qcow2/mod.rs, "Where things are"); they form none now.
];

struct Module {
    file: PathBuf,
    /// Comment-free source.
    code: String,
    /// Name re-exported here -> the path it comes from (absolute segments).
    reexports: BTreeMap<String, Vec<String>>,
}

fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            }
            if !in_str && c == '/' && prev == '/' {
                cut = i - 1;
                break;
            }
            prev = c;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Expands a `use` tree (`a::{b, c::{d, e as f}}`) into flat paths.
fn expand_tree(tree: &str) -> Vec<String> {
    fn go(s: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut cur = String::new();
        while *i < s.len() {
            let c = s[*i] as char;
            *i += 1;
            match c {
                '{' => {
                    let p = format!("{prefix}{}", cur.trim());
                    go(s, i, &p, out);
                    cur.clear();
                }
                '}' => break,
                ',' => {
                    if !cur.trim().is_empty() {
                        out.push(format!("{prefix}{}", cur.trim()));
                    }
                    cur.clear();
                }
                c if c.is_whitespace() && !cur.contains(" as") && !cur.ends_with("as") => {
                    if cur.ends_with(|ch: char| ch.is_alphanumeric() || ch == '_') {
                        cur.push(' ');
                    }
                }
                c => cur.push(c),
            }
        }
        let cur = cur.trim();
        if !cur.is_empty() && !cur.ends_with("::") {
            out.push(format!("{prefix}{cur}"));
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    go(tree.as_bytes(), &mut i, "", &mut out);
    out.into_iter()
        .map(|p| p.split(" as ").next().unwrap().trim().replace(' ', ""))
        .collect()
}

/// Makes `path` (as written in module `here`) absolute, as segments.
fn absolute(here: &str, path: &str, children: &BTreeSet<String>) -> Option<Vec<String>> {
    let mut segs: Vec<String> = path.split("::").map(str::to_owned).collect();
    let mut base: Vec<String> = if here.is_empty() {
        Vec::new()
    } else {
        here.split("::").map(str::to_owned).collect()
    };
    match segs[0].as_str() {
        "crate" => {
            segs.remove(0);
            Some(segs)
        }
        "super" | "self" => {
            while !segs.is_empty() && (segs[0] == "super" || segs[0] == "self") {
                if segs.remove(0) == "super" {
                    base.pop()?;
                }
            }
            base.extend(segs);
            Some(base)
        }
        first => {
            let child = if here.is_empty() {
                first.to_owned()
            } else {
                format!("{here}::{first}")
            };
            children.contains(&child).then(|| {
                base.extend(segs);
                base
            })
        }
    }
}

struct Crate {
    modules: BTreeMap<String, Module>,
}

impl Crate {
    fn load(src: &Path) -> Crate {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut modules = BTreeMap::new();
        for file in files {
            let code = strip_comments(&fs::read_to_string(&file).unwrap());
            modules.insert(
                module_path(src, &file),
                Module {
                    file,
                    code,
                    reexports: BTreeMap::new(),
                },
            );
        }
        let names: BTreeSet<String> = modules.keys().cloned().collect();
        let use_re = |code: &str, public_only: bool| {
            let mut out = Vec::new();
            let mut rest = code;
            while let Some(at) = rest.find("use ") {
                let before = &rest[..at];
                let line_start = before.rfind('\n').map_or(0, |n| n + 1);
                let head = before[line_start..].trim();
                let ok_head = head.is_empty()
                    || head == "pub"
                    || head.starts_with("pub(")
                    || head.ends_with('{')
                    || head.ends_with(';');
                let boundary = at == 0
                    || !rest[..at]
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_');
                let after = &rest[at + 4..];
                let end = after.find(';').unwrap_or(after.len());
                if ok_head && boundary && (!public_only || head.starts_with("pub")) {
                    out.push(after[..end].to_owned());
                }
                rest = &after[end.min(after.len())..];
            }
            out
        };
        let mut reexports = BTreeMap::new();
        for (name, m) in &modules {
            let mut map = BTreeMap::new();
            for tree in use_re(&m.code, true) {
                for path in expand_tree(&tree) {
                    if let Some(abs) = absolute(name, &path, &names) {
                        let last = abs.last().unwrap().clone();
                        if last != "self" && last != "*" {
                            map.insert(last, abs);
                        }
                    }
                }
            }
            reexports.insert(name.clone(), map);
        }
        for (name, map) in reexports {
            modules.get_mut(&name).unwrap().reexports = map;
        }
        Crate { modules }
    }

    /// The module that defines what `abs` names.
    fn defining_module(&self, abs: &[String]) -> Option<String> {
        let mut seen = 0;
        let mut abs = abs.to_vec();
        loop {
            let mut best = None;
            for len in (0..=abs.len()).rev() {
                let m = abs[..len].join("::");
                if self.modules.contains_key(&m) {
                    best = Some((m, len));
                    break;
                }
            }
            let (module, len) = best?;
            if len < abs.len() {
                if let Some(target) = self.modules[&module].reexports.get(&abs[len]) {
                    seen += 1;
                    if seen > 16 {
                        return Some(module);
                    }
                    let mut next = target.clone();
                    next.extend_from_slice(&abs[len + 1..]);
                    abs = next;
                    continue;
                }
            }
            return Some(module);
        }
    }

    /// Module -> (module it refers to -> an example reference).
    fn edges(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let names: BTreeSet<String> = self.modules.keys().cloned().collect();
        let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (name, m) in &self.modules {
            let out = edges.entry(name.clone()).or_default();
            let mut add = |path: String| {
                let Some(abs) = absolute(name, &path, &names) else {
                    return;
                };
                let Some(target) = self.defining_module(&abs) else {
                    return;
                };
                let is_ancestor_decl = target.is_empty();
                if target != *name && !is_ancestor_decl {
                    out.entry(target).or_insert(path);
                }
            };
            // Paths written inline or in `use` trees.
            let code = &m.code;
            let bytes = code.as_bytes();
            for start in ["crate::", "super::"] {
                let mut from = 0;
                while let Some(at) = code[from..].find(start) {
                    let at = from + at;
                    from = at + start.len();
                    if at > 0
                        && (bytes[at - 1].is_ascii_alphanumeric()
                            || bytes[at - 1] == b'_'
                            || bytes[at - 1] == b':')
                    {
                        continue;
                    }
                    let rest = &code[at..];
                    let end = rest
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .unwrap_or(rest.len());
                    let path = rest[..end].trim_end_matches(':').to_owned();
                    if rest[end..].starts_with('{')
                        || rest[..end].ends_with("::") && rest[end..].starts_with('{')
                    {
                        // A use tree: expand it.
                        let close = matching_brace(rest, end);
                        for p in expand_tree(&rest[..close]) {
                            add(p);
                        }
                    } else {
                        add(path);
                    }
                }
            }
            // `use child::…` (relative paths to child modules).
            for line in code.lines() {
                let t = line.trim_start();
                let t = t
                    .strip_prefix("pub(crate) ")
                    .or_else(|| t.strip_prefix("pub "))
                    .unwrap_or(t);
                if let Some(tree) = t.strip_prefix("use ") {
                    let first = tree.split("::").next().unwrap_or("");
                    if !["crate", "super", "self", "std", "core"].contains(&first) {
                        for p in expand_tree(tree.trim_end_matches(';')) {
                            add(p);
                        }
                    }
                }
            }
        }
        // `pub use` lines are declarations, not imports: drop edges that only
        // come from re-exporting a child.
        for (name, out) in edges.iter_mut() {
            let reexported: BTreeSet<String> = self.modules[name]
                .reexports
                .values()
                .filter_map(|abs| self.defining_module(abs))
                .collect();
            let code = &self.modules[name].code;
            out.retain(|target, _| {
                if !reexported.contains(target) {
                    return true;
                }
                // Still an import if the module uses the item in its own code
                // beyond the `pub use` line.
                let used_elsewhere = code.lines().any(|l| {
                    let t = l.trim_start();
                    !t.starts_with("pub use")
                        && !t.starts_with("pub(crate) use")
                        && !t.starts_with("mod ")
                        && !t.starts_with("pub mod ")
                        && !t.starts_with("pub(crate) mod ")
                        && contains_word(t, target.rsplit("::").next().unwrap())
                });
                used_elsewhere
            });
        }
        edges
    }
}

/// Whether `word` occurs in `line` as a whole identifier.
fn contains_word(line: &str, word: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

fn matching_brace(s: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap()
}

fn layer(module: &str) -> Option<u32> {
    LAYERS
        .iter()
        .find(|(name, _, _)| *name == top(module))
        .map(|(_, l, _)| *l)
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let targets: Vec<&'a str> = s
            .edges
            .get(v)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for w in targets {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = BTreeSet::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                comp.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_layer_imports_only_from_the_layers_below_it() {
    let krate = Crate::load(&src_dir());
    let mut wrong = Vec::new();
    for (from, targets) in krate.edges() {
        if from.is_empty() {
            continue; // lib.rs: declarations and the public re-exports
        }
        let Some(lf) = layer(&from) else {
            wrong.push(format!("module `{from}` is in no layer: add it to LAYERS"));
            continue;
        };
        for (to, example) in targets {
            if to.is_empty() || top(&to) == top(&from) {
                continue;
            }
            let lt = layer(&to).unwrap_or(u32::MAX);
            if lt >= lf {
                wrong.push(format!(
                    "{} (layer {lf}) imports `{example}` from `{to}` (layer {lt})",
                    krate.modules[&from].file.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that go up or sideways between layers:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn no_import_cycles_outside_the_listed_knots() {
    let krate = Crate::load(&src_dir());
    if std::env::var_os("MODULE_GRAPH_DUMP").is_some() {
        for (from, targets) in krate.edges() {
            let to: Vec<_> = targets
                .iter()
                .map(|(t, via)| format!("{t} ({via})"))
                .collect();
            eprintln!("{from} -> {}", to.join(", "));
        }
    }
    let found = cycles(&krate.edges());
    let expected: Vec<BTreeSet<String>> = KNOTS
        .iter()
        .map(|(members, _)| members.iter().map(|m| m.to_string()).collect())
        .collect();
    let unexpected: Vec<_> = found.iter().filter(|c| !expected.contains(c)).collect();
    let gone: Vec<_> = expected.iter().filter(|c| !found.contains(c)).collect();
    assert!(
        unexpected.is_empty() && gone.is_empty(),
        "import cycles differ from KNOTS.\nfound but not listed: {unexpected:#?}\nlisted but not \
         found: {gone:#?}"
    );
}

/// The text of DESIGN.md §11's module list, generated from the code.
fn module_graph_text(krate: &Crate) -> String {
    let edges = krate.edges();
    let mut out = String::new();
    for (name, l, what) in LAYERS {
        let mut uses = BTreeSet::new();
        let mut files = 0;
        for (from, targets) in &edges {
            if top(from) != *name {
                continue;
            }
            files += 1;
            for to in targets.keys() {
                if !to.is_empty() && top(to) != *name {
                    uses.insert(top(to).to_owned());
                }
            }
        }
        let uses: Vec<_> = uses.into_iter().collect();
        out.push_str(&format!(
            "- {l} `{name}` ({files} files): {what}; imports {}\n",
            if uses.is_empty() {
                "nothing".to_owned()
            } else {
                uses.iter()
                    .map(|u| format!("`{u}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    out
}

#[test]
fn design_md_shows_the_module_graph_the_code_has() {
    let krate = Crate::load(&src_dir());
    let text = module_graph_text(&krate);
    let design_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("DESIGN.md");
    let design = fs::read_to_string(&design_path).unwrap();
    let begin = "<!-- module-graph:begin -->\n";
    let end = "<!-- module-graph:end -->";
    let (Some(b), Some(e)) = (design.find(begin), design.find(end)) else {
        panic!("DESIGN.md lacks the {begin:?} … {end:?} markers of §11");
    };
    let current = &design[b + begin.len()..e];
    if current != text {
        if std::env::var_os("BLESS_MODULE_GRAPH").is_some() {
            let updated = format!("{}{text}{}", &design[..b + begin.len()], &design[e..]);
            fs::write(&design_path, updated).unwrap();
        } else {
            panic!("DESIGN.md §11 is out of date; run with BLESS_MODULE_GRAPH=1 or paste:\n{text}");
        }
    }
}

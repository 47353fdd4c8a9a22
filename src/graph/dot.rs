//! Graphviz DOT rendering of the graph.

use std::fmt::Write;

use crate::graph::proof::GraphView;
use crate::graph::proof::Proof;

/// A DOT string literal whose lines are separated by DOT's `\n` escape.
fn quote(s: &str) -> String {
    let escaped: Vec<String> = s
        .lines()
        .map(|line| line.replace('\\', "\\\\").replace('"', "\\\""))
        .collect();
    format!("\"{}\"", escaped.join("\\n"))
}

pub(crate) fn render<P: Proof>(view: GraphView<'_, P>) -> String {
    let mut out = String::from("digraph blockgraph {\n  rankdir=TB;\n");
    for backend in view.backends() {
        let _ = writeln!(
            out,
            "  {} [shape=box, style=rounded, label={}];",
            quote(&format!("backend:{}", backend.name())),
            quote(&format!("{}\nbackend", backend.name()))
        );
        if let Some(root) = backend.root() {
            let p = backend.permissions();
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quote(&format!("backend:{}", backend.name())),
                quote(root.name()),
                quote(&format!("root\ntakes {}\nshares {}", p.take, p.share))
            );
        }
    }
    for node in view.nodes() {
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, label={}];",
            quote(node.name()),
            quote(&format!("{}\n{}", node.name(), node.describe()))
        );
        for child in node.children() {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quote(node.name()),
                quote(child.node.name()),
                quote(&format!(
                    "{}\ntakes {}\nshares {}",
                    child.role, child.perms.take, child.perms.share
                ))
            );
        }
    }
    out.push_str("}\n");
    out
}

// The graph as the page holds it, and re-thresholding.
//
// The server sends every node and link it stored (pruned at the thresholds the graph
// was computed with) with each one's "share": the part of all influence (nodes) or of
// all edge scores (links) held by strictly larger ones. `visible` repeats the pruning
// of tzoo.circuits.attribution.prune at lower thresholds exactly as the server's
// `refilter` does: a node (link) passes when its share is below the threshold (or is 0:
// the largest), token and logit nodes always; then, until nothing changes, links need
// both ends, feature and error nodes need an outgoing link, features an incoming one.

export const KINDS = ["feature", "error", "token", "logit"];

/** Index a graph document (GET /api/graphs/{slug}) for drawing and filtering. */
export function prepare(doc) {
  const info = doc.tzoo;
  const nodes = doc.nodes.map((node, i) => ({
    i,
    id: node.node_id,
    kind: node.tzoo.kind,
    layer: node.tzoo.layer,
    position: node.tzoo.position,
    feature: node.tzoo.feature,
    token: node.tzoo.token,
    share: node.tzoo.share,
    influence: node.influence,
    activation: node.activation,
    probability: node.token_prob,
    clerp: node.clerp,
    raw: node,
  }));
  const byId = new Map(nodes.map((node) => [node.id, node]));
  const links = doc.links.map((link, i) => ({
    i,
    source: byId.get(link.source),
    target: byId.get(link.target),
    weight: link.weight,
    share: link.share,
  }));
  let logitRank = 0;
  for (const node of nodes) {
    node.text = node.kind === "logit"
      ? info.logit_strings[logitRank++] ?? ""
      : info.prompt_tokens[node.position] ?? "";
    node.incoming = [];
    node.outgoing = [];
  }
  for (const link of links) {
    link.source.outgoing.push(link);
    link.target.incoming.push(link);
  }
  return { info, metadata: doc.metadata, nodes, links, byId };
}

/**
 * Which nodes and links pass the thresholds.
 * @returns {{ nodes: boolean[], links: boolean[] }}
 */
export function visible(graph, nodeThreshold, edgeThreshold) {
  // The server compares float32 shares with float32 thresholds; so do we.
  const tn = Math.fround(nodeThreshold);
  const te = Math.fround(edgeThreshold);
  const nodes = graph.nodes.map(
    (n) => n.kind === "token" || n.kind === "logit" || n.share === 0 || n.share < tn,
  );
  const links = graph.links.map((l) => l.share === 0 || l.share < te);
  for (;;) {
    const hasOut = new Array(nodes.length).fill(false);
    const hasIn = new Array(nodes.length).fill(false);
    graph.links.forEach((link, e) => {
      links[e] = links[e] && nodes[link.source.i] && nodes[link.target.i];
      if (links[e]) {
        hasOut[link.source.i] = true;
        hasIn[link.target.i] = true;
      }
    });
    let changed = false;
    graph.nodes.forEach((node, i) => {
      if (!nodes[i]) return;
      const internal = node.kind === "feature" || node.kind === "error";
      if ((internal && !hasOut[i]) || (node.kind === "feature" && !hasIn[i])) {
        nodes[i] = false;
        changed = true;
      }
    });
    if (!changed) return { nodes, links };
  }
}

/** A short name for a node: "F12 L1", "Err L1", "Emb", "Logit". */
export function shortName(node) {
  if (node.kind === "feature") return `L${node.layer} F${node.feature}`;
  if (node.kind === "error") return `L${node.layer} error`;
  if (node.kind === "token") return "embedding";
  return "logit";
}

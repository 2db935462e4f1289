"""What attention explains: traces, alignments and their scores, rollout and flow, attribution,
faithfulness, figures and a browsable page (`--mode=interpret` assembles them).

One idea a module: `traces`, `alignments`, `alignment_scores`, `pointing_totals`,
`rollout`, `flow`, `attribution`, `faithfulness`, `example_views`, `figures`
(`spatial_figures`, `score_figures`), `html_page`, and `plots` (the training loop's heat maps).
"""

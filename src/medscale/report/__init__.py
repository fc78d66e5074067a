"""Human-facing output: console tables of manifests and evaluation results and `medscale inspect`
(`console`), the report's HTML pieces that objectives use (`tables`), its figures (`figures`), and
`medscale report` (`html.write_report`: figures and one self-contained HTML page of a run).

Nothing is imported here: `medscale inspect` and `medscale eval` import `console` alone and do not
pay for the report's imports.
"""

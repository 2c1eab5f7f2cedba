from eval.tables import format_number, render_markdown_table, render_table


def test_format_number():
    assert format_number(1.23e9, kind="flops") == "1.23 G"
    assert format_number(134_515_008, kind="params") == "135 M"
    assert format_number(12_345_678, kind="flops") == "12.3 M"
    assert format_number(2_500, kind="si") == "2.50 k"
    assert format_number(12.3456, kind="ppl") == "12.35"
    assert format_number(0.256, kind="pct") == "25.6%"
    assert format_number(None) == "-"
    assert format_number(float("nan")) == "nan"
    assert format_number(12345) == "12,345"
    assert format_number(0.123456) == "0.123"
    assert format_number("text") == "text"


def test_render_table_aligns_columns():
    rows = [{"method": "dense", "ppl": 12.3456, "flops": 1_000}, {"method": "2:4 wanda", "ppl": 100.0}]
    text = render_table(rows, ["method", "ppl", "flops"])
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 4
    assert lines[0].split() == ["method", "ppl", "flops"]
    assert set(lines[1]) <= {"-", " "}
    # numbers right-aligned: the ppl values end in the same column
    ppl_end = lines[0].index("ppl") + len("ppl")
    assert lines[2][:ppl_end].endswith("12.3") and lines[3][:ppl_end].endswith("100")
    assert lines[3].rstrip().endswith("-")  # missing value
    assert lines[2].startswith("dense ")


def test_render_markdown_table():
    rows = [{"method": "a|b", "acc": 0.5}]
    md = render_markdown_table(rows, ["method", "acc"])
    assert md.splitlines() == ["| method | acc |", "|---|---:|", "| a\\|b | 0.500 |"]

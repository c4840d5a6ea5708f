"""Reports quote the data, never run it (issue 21, item 3): a path, a class name or a reader's message
that holds HTML, Markdown or mathtext reaches report.md, report.html, the model card and the Prefect
artifact as the literal text, and the figures draw it as written."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import markdown
import pytest
import yaml

from ssl_models.core.config import load_config
from tasks.figures import plot_embeddings
from tasks.io import write_jsonl
from tasks.stages.evaluate import evaluate
from tasks.stages.report import build_html, code_fence, code_span, markdown_text, report
from tests.conftest import tiny_params, write_params
from tests.tasks.test_evaluate import project_with_finetune_outputs, synthetic_finetune
from tests.tasks.test_report import every_protocol

IMG = "<img src=x onerror=alert(1)>"
MATH = r"$\undefinedmacro{x}$"
LABELS = f"lab{IMG}/labels.csv"  # the labels CSV, in a folder of that name
CLASSES = [MATH, "a|b `tick`", "*bold* [x](javascript:alert(1))", "<h1>class</h1> & 'q' \"q\""]
REASONS = ["broken PNG file (chunk b'<h1>')", f"unreadable: {IMG}", "# not a heading | *bold* `code`\n\n<h1>x"]
# every tag the report's page has from its own template and Markdown, nothing else
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "strong", "code", "pre", "ul",
             "li", "div", "table", "thead", "tbody", "tr", "th", "td", "img"}
FIGURES = {"label_efficiency.png", "pretraining.png", "embedding_2d.png"}


class Page(HTMLParser):
    """A page's start tags (with attributes) and its text as a reader sees it (entities resolved)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.chunks: list[str] = []
        self.feed(page)
        self.close()
        self.text = "".join(self.chunks)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def shown(text: str) -> str:
    """How a Markdown viewer that passes raw HTML through (python-markdown's default) shows `text`."""
    return markdown.markdown(text, extensions=["tables", "fenced_code"])


HOSTILE = [IMG, MATH, "a|b", "`tick` ``two``", "*bold* _em_ __init__", "[x](javascript:alert(1))", "# heading",
           "1. item", "- item", "+ item", "back\\slash \\* \\`", "&lt; &amp; & < > \" '", "x\n\n<h1>y</h1>"]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_from_the_data_renders_as_its_own_text_in_a_sentence_and_a_table_cell(value: str) -> None:
    literal = " ".join(value.split("\n\n"))  # a value is one line of the report
    for text, wrapper in ((f"Reason: {markdown_text(value)}.", "p"),
                          (f"| a | b |\n|---|---|\n| {markdown_text(value)} | 1 |", "td")):
        page = Page(shown(text))
        assert {tag for tag, _ in page.tags} <= {"p", "table", "thead", "tbody", "tr", "th", "td"}, text
        assert literal in page.text, (text, page.text)
    cell = Page(shown(f"| a | b |\n|---|---|\n| {markdown_text(value)} | 1 |"))
    assert sum(tag == "td" for tag, _ in cell.tags) == 2  # a `|` in the value starts no third cell


def test_ordinary_values_are_printed_as_given() -> None:
    for value in ("data/legal/my_labels.csv", "legal_text", "cannot decode: truncated file (in preprocess)",
                  "images/slide-01.svs", "Copyleft"):
        assert markdown_text(value) == value
    assert code_span("dvc exp run") == "`dvc exp run`" and Page(shown(code_span("a ``b` c"))).text == "a ``b` c"


def test_a_line_of_backticks_in_the_lineage_stays_inside_its_code_block() -> None:
    lineage = "inputs:\n```\n<h1>corpus/```x</h1>\n````"  # paths are the user's folder names
    fence = code_fence(lineage)
    page = Page(shown(f"{fence}\n{lineage}\n{fence}\n"))
    assert [tag for tag, _ in page.tags] == ["pre", "code"] and page.text == lineage + "\n"
    assert code_fence("inputs: data/legal/manifest") == "```"


def test_the_html_step_keeps_raw_html_as_text() -> None:
    """A value a template would miss still cannot become a tag: build_html passes no raw HTML through."""
    page = Page(build_html("legal", f"# Report\n\n{IMG} and <h1>x</h1>\n\n<script>alert(1)</script>\n"))
    assert [tag for tag, _ in page.tags if tag in {"img", "script"}] == []
    assert [tag for tag, _ in page.tags].count("h1") == 1 and IMG in page.text and "<script>" in page.text


def test_class_names_with_mathtext_are_drawn_as_written(tmp_path: Path) -> None:
    import matplotlib

    embedding = {"labels": [0, 1, 2, 3], "classes": CLASSES, "method": "pca",
                 "inits": {"ssl": [[0, 0], [1, 1], [2, 0], [0, 2]]}}
    with pytest.raises(ValueError):  # what the report stage died of: mathtext parses a label with `$`
        matplotlib.mathtext.MathTextParser("path").parse(MATH)
    plot_embeddings(embedding, tmp_path / "embedding_2d.png")
    assert (tmp_path / "embedding_2d.png").stat().st_size > 5_000
    assert matplotlib.rcParams["text.parse_math"]  # the figures leave the caller's settings alone


@pytest.fixture
def hostile_project(tmp_path: Path) -> tuple:
    """The tiny legal project after evaluate, whose labels CSV lies in a folder named like an HTML tag,
    whose class names hold mathtext and Markdown, and whose quarantine reasons hold HTML."""
    finetuned = synthetic_finetune({**every_protocol("ssl", 0.7), **every_protocol("scratch", 0.35),
                                    ("baseline", "linear"): 0.75}, fractions=(0.1, 1.0), n_test=120)
    finetuned["classes"] = CLASSES
    _, _, paths = project_with_finetune_outputs(tmp_path, finetuned)
    # the user's own corpus (so the task names the labels file), not the embedded default data
    write_params(tmp_path, tiny_params(corpus="corpus", labels=LABELS, finetune={"bootstrap_samples": 300}))
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    write_jsonl(paths.manifest / "quarantine.jsonl", [{"key": f"file{i}.png", "reason": reason}
                                                      for i, reason in enumerate(REASONS)])
    evaluate(cfg, domain, paths)
    return cfg, domain, paths


def literal_reasons() -> list[str]:
    return [" ".join(reason.split("\n\n")) for reason in REASONS]


def assert_quoted(page: Page, where: str) -> None:
    """No tag on the page but the template's own; its images are the report's figures."""
    tags = [tag for tag, _ in page.tags]
    assert set(tags) <= PAGE_TAGS, where
    assert tags.count("h1") == 1, where
    assert all(attrs.get("src") in FIGURES and set(attrs) == {"src", "alt"} for tag, attrs in page.tags
               if tag == "img"), where
    assert not [attrs for _, attrs in page.tags if any(name.startswith("on") for name in attrs)], where


def test_the_report_quotes_paths_labels_and_reasons_and_draws_its_figures(hostile_project: tuple) -> None:
    cfg, domain, paths = hostile_project
    text = report(cfg, domain, paths)  # completes: mathtext in a class name no longer stops it
    assert {path.name for path in paths.report.glob("*.png")} == FIGURES
    page = Page((paths.report / "report.html").read_text())
    assert_quoted(page, "report.html")
    for literal in [LABELS, *literal_reasons()]:
        assert literal in page.text, literal
    # the Markdown itself, in a viewer that passes raw HTML through (as GitHub's or Prefect's would)
    viewed = Page(shown(text))
    assert_quoted(viewed, "report.md")
    assert all(literal in viewed.text for literal in [LABELS, *literal_reasons()])


def test_the_prefect_artifacts_carry_the_escaped_report(hostile_project: tuple) -> None:
    from flows.pipeline import report_artifacts

    cfg, domain, paths = hostile_project
    report(cfg, domain, paths)
    artifacts = report_artifacts("legal", str(paths.root))
    assert artifacts["markdown"]["markdown"] == (paths.report / "report.md").read_text()
    viewed = Page(shown(artifacts["markdown"]["markdown"]))
    assert_quoted(viewed, "the Markdown artifact")
    assert all(literal in viewed.text for literal in [LABELS, *literal_reasons()])
    assert all(link["link"].startswith("file://") for link in artifacts["links"])
    assert [link["key"] for link in artifacts["links"]] == ["legal-report-html", "legal-export"]
    assert [row["against"] for row in artifacts["table"]["table"]] == ["scratch", "baseline"] * 2


def test_the_artifacts_quote_a_domain_name_in_their_descriptions_and_link_texts(hostile_project: tuple) -> None:
    """A domain's name (a folder name too) is shown as written where Prefect renders Markdown."""
    import shutil

    from prefect.artifacts import LinkArtifact, MarkdownArtifact, TableArtifact

    from flows.pipeline import report_artifacts

    cfg, domain, paths = hostile_project
    report(cfg, domain, paths)
    name = "x*y* [z](javascript:alert(1))"
    shutil.copytree(paths.root / "reports" / "legal", paths.root / "reports" / name)
    artifacts = report_artifacts(name, str(paths.root))
    MarkdownArtifact(**artifacts["markdown"]), TableArtifact(**artifacts["table"])  # keys Prefect takes
    for text in [artifacts["markdown"]["description"], artifacts["table"]["description"],
                 *(LinkArtifact(**link).format() for link in artifacts["links"])]:  # Prefect's own Markdown
        page = Page(shown(text))
        assert name in page.text and {tag for tag, _ in page.tags} <= {"p", "a"}, text
        assert all(attrs["href"].startswith("file://") for tag, attrs in page.tags if tag == "a"), text
    assert [artifacts[kind]["key"] for kind in ("markdown", "table")] == ["x-y-z-javascript-alert-1-report",
                                                                         "x-y-z-javascript-alert-1-verdict"]


def model_card_of(cfg, domain, paths) -> str:  # noqa: ANN001 - the parsed block, its domain, its paths
    from tasks.export import model_card

    about = {"format": "a transformers model", "library": "transformers", "inputs": "texts",
             "snippet": "embed = None\n"}
    return model_card(cfg, domain, paths, "ssl", about)


def test_the_model_card_quotes_reasons_and_its_front_matter_stays_yaml(hostile_project: tuple) -> None:
    cfg, domain, paths = hostile_project
    card = model_card_of(cfg, domain, paths)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "legal" in front["tags"]
    assert {m["name"] for m in front["model-index"][0]["results"][0]["metrics"]} >= {
        "ssl linear with 10% of labels", "baseline linear with 100% of labels"}
    body = card.split("---\n", 2)[2]
    reasons = [line.strip() for line in body.split("- Quarantined, by reason")[1].split("\n- De-identification")[0]
               .splitlines() if line.startswith("    - ")]
    assert len(reasons) == len(REASONS)
    viewed = Page(shown("\n".join(reasons)))
    assert {tag for tag, _ in viewed.tags} <= {"p", "ul", "li"}
    assert all(literal in viewed.text for literal in literal_reasons())


def test_the_model_card_quotes_the_labels_path(hostile_project: tuple) -> None:
    cfg, domain, paths = hostile_project
    viewed = Page(shown(model_card_of(cfg, domain, paths).split("---\n", 2)[2]))
    assert "img" not in {tag for tag, _ in viewed.tags} and LABELS in viewed.text

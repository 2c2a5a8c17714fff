//! The HTML page (stub).
use crate::input::Run;
use crate::report::Report;

/// Renders a self-contained page.
pub fn render(_run: &Run, r: &Report) -> String {
    format!("<pre>{}</pre>", crate::render_text::render(r))
}

//! APIM policy XML: read `<policies>` documents into gateway-core's types, and
//! write them back.

pub mod expr;
pub mod read;
pub mod source;
pub mod write;

pub use read::{read, read_all, Diagnostic, PolicyDocument, ReadOptions};
pub use source::PolicySource;
pub use write::write;

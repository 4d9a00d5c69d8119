//! A request field that is a JSON string, and only a string.
//!
//! poem-openapi's `String` also takes a JSON number or boolean (`false` becomes `"false"`),
//! although the document says `type: string`: a request the document refuses would be
//! accepted. [`Text`] refuses anything but a string (400 `invalid_field`, like every schema
//! failure) and is described exactly as `String` is, validators included.

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use serde_json::Value;

/// A JSON string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(pub String);

impl Text {
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;

    type RawValueType = String;

    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new("string")))
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => Ok(Text(text)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_strings_are_text() {
        assert_eq!(Text::parse_from_json(Some(Value::String("ann".into()))).ok(), Some(Text("ann".into())));
        for other in [Value::Bool(false), serde_json::json!(12), Value::Null, serde_json::json!(["a"])] {
            assert!(Text::parse_from_json(Some(other.clone())).is_err(), "{other}");
        }
        assert!(<Option<Text>>::parse_from_json(None).is_ok_and(|text| text.is_none()));
    }
}

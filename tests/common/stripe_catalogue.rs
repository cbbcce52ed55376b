//! How the Stripe fakes (the test fake in `tests/it/fake_stripe.rs` and the benchmark's
//! `examples/fake_stripe.rs`) vary Stripe's example objects by index, so both serve the same
//! catalogue. Included by path from both.

use serde_json::{Value, json};

/// Stripe's example product as product `i`, with its id and default price.
pub fn product(template: &Value, i: usize, id: String, default_price: String) -> Value {
    let mut object = template.clone();
    object["id"] = json!(id);
    object["name"] = json!(format!("Product {i}"));
    object["default_price"] = json!(default_price);
    object["active"] = json!(!i.is_multiple_of(7));
    object
}

/// Stripe's example price as price `i` of `product`.
pub fn price(template: &Value, i: usize, id: String, product: String) -> Value {
    let mut object = template.clone();
    object["id"] = json!(id);
    object["product"] = json!(product);
    object["unit_amount"] = json!(100 + i);
    object["active"] = json!(!i.is_multiple_of(5));
    if i.is_multiple_of(2) {
        object["type"] = json!("one_time");
        object["recurring"] = Value::Null;
    }
    object
}

//! HTTP requests.

mod head;
mod request;

pub use self::{
    head::{ForwardedHead, RequestHead, RequestHeadType},
    request::Request,
};

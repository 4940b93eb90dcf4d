//! The agent: Slipway's side on an SSH host (being built).

pub async fn main(_args: Vec<String>) -> Result<u8, String> {
    Err("the ssh agent is being built".into())
}
